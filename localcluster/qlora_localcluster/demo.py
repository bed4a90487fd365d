"""The end-to-end demo behind `make demo`: SmolLM2-135M-Instruct learns a reply format through a
QLoRAJob on the local cluster, and the adapter it publishes to S3 is loaded back and compared.

    python -m qlora_localcluster.demo          # after `python -m qlora_localcluster up`
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import boto3
import yaml
from botocore.config import Config

from . import operator_install
from .cluster import LocalCluster

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "samples" / "training_v1alpha1_qlorajob.yaml"
DATA = REPO / "samples" / "data"
MODEL_PREFIX = "smollm2-135m-instruct/"
PROMPTS = ["What is the capital of Portugal?", "What is 4 plus 5?"]


def s3_client(cluster: LocalCluster):
    return boto3.client("s3", endpoint_url=cluster.s3_endpoint, region_name="us-east-1",
                        config=Config(s3={"addressing_style": "path"}), **cluster.s3_credentials)


def ensure_bucket(s3, name: str) -> None:
    if name not in {b["Name"] for b in s3.list_buckets()["Buckets"]}:
        s3.create_bucket(Bucket=name)


def upload_model_once(s3, cache: Path) -> Path:
    """Export the packaged GGUF to safetensors (once, cached) and store it in s3://models/."""
    from qlora_trainer.pretrained_sample import export_smollm2

    if not (cache / "config.json").exists():
        say("exporting SmolLM2-135M-Instruct from its GGUF to safetensors (once)")
        export_smollm2(cache)
    ensure_bucket(s3, "models")
    present = {o["Key"] for o in s3.list_objects_v2(Bucket="models", Prefix=MODEL_PREFIX).get("Contents", [])}
    for path in sorted(p for p in cache.iterdir() if p.is_file()):
        if MODEL_PREFIX + path.name not in present:
            s3.upload_file(str(path), "models", MODEL_PREFIX + path.name)
    return cache


def upload_dataset(s3) -> None:
    ensure_bucket(s3, "datasets")
    s3.upload_file(str(DATA / "chat_format_train.jsonl"), "datasets", "chat-format/train.jsonl")
    s3.upload_file(str(DATA / "chat_format_eval.jsonl"), "datasets", "chat-format/eval.jsonl")


def credentials_secret(cluster: LocalCluster, namespace: str = "default") -> None:
    secret = {
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "local-s3", "namespace": namespace},
        "stringData": {"AWS_ACCESS_KEY_ID": cluster.settings.s3_access_key,
                       "AWS_SECRET_ACCESS_KEY": cluster.settings.s3_secret_key},
    }
    operator_install.kubectl(cluster, "apply", "-f", "-", input=json.dumps(secret))


def run_job(cluster: LocalCluster, timeout: float = 1800) -> dict:
    """Apply the sample (replacing an earlier run of it) and follow its status to the end."""
    name = yaml.safe_load(SAMPLE.read_text())["metadata"]["name"]
    operator_install.kubectl(cluster, "delete", "qlorajob", name, "--ignore-not-found", "--wait=true")
    operator_install.kubectl(cluster, "apply", "-f", str(SAMPLE))
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        job = json.loads(operator_install.kubectl(cluster, "get", "qlorajob", name, "-o", "json"))
        status = job.get("status", {})
        progress = status.get("progress") or {}
        loss = f"{progress['loss']:.3f}" if progress.get("loss") is not None else "-"
        line = f"{status.get('phase', 'Pending'):10} {progress.get('summary', ''):14} loss={loss:6}  " \
               f"{status.get('message', '')}"
        if line != last:
            say(line)
            last = line
        if status.get("phase") in ("Succeeded", "Failed"):
            return job
        time.sleep(2)
    raise TimeoutError(f"qlorajob/{name} did not finish in {timeout:.0f} s")


def generate(model, tokenizer, prompt: str) -> str:
    import torch

    messages = [{"role": "user", "content": prompt}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=24, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def compare_generations(s3, base_dir: Path, adapter_uri: str) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    bucket, _, prefix = adapter_uri.removeprefix("s3://").partition("/")
    adapter_dir = Path(tempfile.mkdtemp(prefix="adapter-"))
    for obj in s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", []):
        rel = obj["Key"][len(prefix):].lstrip("/")
        if rel and "/" not in rel:
            s3.download_file(bucket, obj["Key"], str(adapter_dir / rel))
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    before = {p: generate(base, tokenizer, p) for p in PROMPTS}
    tuned = PeftModel.from_pretrained(base, adapter_dir)
    for prompt in PROMPTS:
        say(f"prompt: {prompt}")
        say(f"  base model:   {before[prompt]!r}")
        say(f"  with adapter: {generate(tuned, tokenizer, prompt)!r}")


def main() -> int:
    cluster = LocalCluster()
    if not cluster.is_ready():
        cluster.up()
    s3 = s3_client(cluster)
    base_dir = upload_model_once(s3, cluster.state_dir / "models" / "smollm2-135m-instruct")
    upload_dataset(s3)
    ensure_bucket(s3, "adapters")
    pod = operator_install.install(cluster)
    say(f"operator installed with helm: pod {operator_install.NAMESPACE}/{pod}, as its own ServiceAccount")
    credentials_secret(cluster)
    job = run_job(cluster)
    status = job["status"]
    if status["phase"] != "Succeeded":
        failed = next((c for c in status.get("conditions", []) if c["type"] == "Failed"), {})
        say(f"the job failed: {failed.get('reason')}: {failed.get('message')}")
        return 1
    result = status["result"]
    say(f"adapter: {result['adapterUri']} (manifest sha256 {result.get('manifestSha256')})")
    bucket, _, prefix = result["adapterUri"].removeprefix("s3://").partition("/")
    for obj in s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", []):
        if "/checkpoints/" not in obj["Key"]:
            say(f"  s3://{bucket}/{obj['Key']}  {obj['Size']} bytes")
    say(f"eval loss: {result.get('evalLossBefore'):.3f} before -> {result.get('evalLossAfter'):.3f} after "
        f"(perplexity {result.get('perplexityBefore'):.1f} -> {result.get('perplexityAfter'):.2f})")
    compare_generations(s3, base_dir, result["adapterUri"])
    say("done: `eval \"$(.venv/bin/python -m qlora_localcluster env)\"; kubectl get qlorajobs` to look around")
    return 0


def say(message: str) -> None:
    print(f"[demo] {message}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
