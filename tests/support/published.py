"""A QLoRAJob whose adapter is published, without a training run: the files go to the cluster's
MinIO through the trainer's own publishing code (files, then manifest.json), and the status is
written through the status subresource the way the operator writes it. For tests of what comes
after training: fetch, serve."""

import json
import os
import time
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import boto3
from botocore.config import Config
from qlora_localcluster.testing import kubectl

CRD = Path(__file__).resolve().parents[2] / "crds" / "training.qlora-operator.dev_qlorajobs.yaml"
ADAPTER_CONFIG = {"base_model_name_or_path": "Qwen/Qwen2.5-0.5B-Instruct", "peft_type": "LORA", "r": 8,
                  "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], "bias": "none", "use_dora": False,
                  "modules_to_save": None, "task_type": "CAUSAL_LM"}


def minio(cluster):
    return boto3.client("s3", endpoint_url=cluster.s3_endpoint, region_name="us-east-1",
                        config=Config(s3={"addressing_style": "path"}), **cluster.s3_credentials)


def ensure_bucket(s3, bucket: str) -> None:
    try:
        s3.create_bucket(Bucket=bucket)
    except s3.exceptions.BucketAlreadyOwnedByYou:
        pass


@contextmanager
def cluster_s3_env(cluster):
    """The trainer's S3 code reads credentials from the environment, as in its pod."""
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    os.environ["AWS_ACCESS_KEY_ID"] = cluster.s3_credentials["aws_access_key_id"]
    os.environ["AWS_SECRET_ACCESS_KEY"] = cluster.s3_credentials["aws_secret_access_key"]
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def publish_files(cluster, bucket: str, key_prefix: str, files: dict[str, bytes], workdir: Path) -> dict:
    """Upload `files` and their manifest with the trainer's publishing code; the result as the status holds it."""
    import hashlib

    from qlora_api.spec import OutputSpec
    from qlora_trainer.publishing import upload_with_manifest
    from qlora_trainer.storage import S3Storage, S3Uri

    ensure_bucket(minio(cluster), bucket)
    local = {}
    for rel, body in files.items():
        path = workdir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(body)
        local[rel] = path
    output = OutputSpec(bucket=bucket, endpoint_url=cluster.s3_endpoint, addressing_style="path")
    with cluster_s3_env(cluster):
        body, entries = upload_with_manifest(S3Storage(output), S3Uri(bucket, key_prefix), local,
                                             {"adapterUri": f"s3://{bucket}/{key_prefix}/"})
    return {"adapterUri": f"s3://{bucket}/{key_prefix}/", "manifestUri": f"s3://{bucket}/{key_prefix}/manifest.json",
            "manifestSha256": hashlib.sha256(body).hexdigest(), "files": [e.to_wire() for e in entries],
            "totalBytes": sum(e.size for e in entries)}


def adapter_files() -> dict[str, bytes]:
    return {"adapter_config.json": json.dumps(ADAPTER_CONFIG).encode(),
            "adapter_model.safetensors": os.urandom(4096),
            "tokenizer.json": b'{"version": "1.0"}'}


def succeeded_job(cluster, namespace: str, name: str, spec: dict, result: dict) -> dict:
    """Create the QLoRAJob and write a Succeeded status with `result` (no operator watches the namespace)."""
    manifest = {"apiVersion": "training.qlora-operator.dev/v1alpha1", "kind": "QLoRAJob",
                "metadata": {"name": name, "namespace": namespace}, "spec": spec}
    kubectl(cluster, "apply", "-f", "-", input=json.dumps(manifest))
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    conditions = [{"type": t, "status": s, "reason": r, "message": m, "lastTransitionTime": now,
                   "observedGeneration": 1}
                  for t, s, r, m in (("Accepted", "True", "Accepted", "the spec is valid"),
                                     ("Running", "False", "Completed", "the trainer finished"),
                                     ("Succeeded", "True", "Succeeded", f"adapter published to {result['adapterUri']}"))]
    status = {"status": {"phase": "Succeeded", "conditions": conditions, "observedGeneration": 1, "attempts": 1,
                         "jobName": f"{name}-1", "result": result}}
    for _ in range(5):
        # Re-applied right before the write: on a cluster shared with other checkouts, their older CRD
        # may have replaced ours, and the API server prunes the status fields it does not know.
        kubectl(cluster, "apply", "--server-side", "--force-conflicts", "-f", str(CRD))
        kubectl(cluster, "-n", namespace, "patch", "qlorajob", name, "--subresource=status", "--type=merge",
                "-p", json.dumps(status))
        job = json.loads(kubectl(cluster, "-n", namespace, "get", "qlorajob", name, "-o", "json").stdout)
        if set(job["status"]["result"]) == set(result):
            return job
        time.sleep(1)
    raise AssertionError(f"the API server kept pruning {set(result) - set(job['status']['result'])} from the status")
