"""The trainer end to end on a GPU: a Qwen2.5-1.5B-shaped model, S3 through an in-process moto server.

Runs the real trainer CLI (`python -m qlora_trainer`) on a random-init model of the Qwen2.5-1.5B
shape (28 layers, hidden 1536, vocab 151936) read from s3://, on a learnable synthetic chat task,
then downloads the published adapter from S3, checks it against the manifest and loads it again
with peft on the 4-bit and on the bf16 base. Prints one table.

    # here: the wheels the GPU machine lacks, trimmed to fit a carry of 64 MiB (into .whl/trainer/)
    python benchmarks/gpu_trainer_e2e.py wheels
    # on the GPU machine (nothing can be downloaded there):
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \\
        --target /tmp/site .whl/trainer/*.whl
    PYTHONPATH=/tmp/site python3 benchmarks/gpu_trainer_e2e.py run --steps 40
    # a rehearsal of the same path on a CPU, with a tiny model of the same family:
    python benchmarks/gpu_trainer_e2e.py run --size tiny --steps 6

A random base is not a pretrained one: the eval loss falls from about ln(151936) = 11.9 as the
adapter learns the task's words and reply format; the point is the machinery and its speed.
"""

import argparse
import hashlib
import json
import logging
import os
import random
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for folder in ("operator", "trainer_image", "tests"):
    sys.path.insert(0, str(REPO / folder))

WHEEL_DIR = REPO / ".whl" / "trainer"
# What the GPU image lacks (its package list is in the device notes), at the versions tested here.
WHEELS = [
    "bitsandbytes==0.50.2", "trl==1.16.0", "datasets==5.2.0", "dill==0.4.1", "multiprocess==0.70.19",
    "peft==0.21.2", "boto3==1.44.8", "botocore==1.44.8", "s3transfer==0.19.3", "jmespath==1.1.0",
    "pydantic==2.14.4", "pydantic-core==2.50.5", "annotated-types==0.8.0", "typing-inspection==0.4.5",
    "moto==5.2.5", "xmltodict==1.0.4", "responses==0.26.3", "flask==3.1.3", "flask-cors==6.0.5",
    "blinker==1.9.0", "itsdangerous==2.2.0",
    "cryptography==50.0.2", "cffi==2.1.1", "pycparser==3.12",  # moto's request path imports its IAM model
]
PLATFORMS = ["manylinux_2_34_x86_64", "manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64", "any"]

QWEN25_15B = {"hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12,
              "num_key_value_heads": 2, "vocab_size": 151936, "max_position_embeddings": 32768, "rope_theta": 1e6,
              "tie_word_embeddings": True, "rms_norm_eps": 1e-6}
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 512, "max_position_embeddings": 4096, "tie_word_embeddings": True,
        "initializer_range": 0.3}


# -- wheels (run here) ---------------------------------------------------------------------------------


def prepare_wheels(cuda: str) -> None:
    """Download the wheels, then drop what the GPU run never loads so that they fit the carry:
    bitsandbytes' libraries for other CUDA/ROCm/XPU versions and botocore's models of AWS
    services other than S3 and STS."""
    WHEEL_DIR.mkdir(parents=True, exist_ok=True)
    platform_args = [a for p in PLATFORMS for a in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", *platform_args,
                    "-d", str(WHEEL_DIR), *WHEELS], check=True)
    keep_lib = {f"libbitsandbytes_cuda{cuda}.so", "libbitsandbytes_cpu.so"}
    for wheel in WHEEL_DIR.glob("bitsandbytes-*.whl"):
        _trim_wheel(wheel, lambda n: not (n.startswith("bitsandbytes/libbitsandbytes_") and n.split("/")[-1]
                                          not in keep_lib))
    for wheel in WHEEL_DIR.glob("botocore-*.whl"):
        _trim_wheel(wheel, lambda n: not n.startswith("botocore/data/") or n.count("/") == 2
                    or n.split("/")[2] in ("s3", "sts"))
    total = sum(p.stat().st_size for p in WHEEL_DIR.glob("*.whl"))
    print(f"{len(list(WHEEL_DIR.glob('*.whl')))} wheels, {total / 2**20:.1f} MiB in {WHEEL_DIR}")


def _trim_wheel(wheel: Path, keep) -> None:
    trimmed = wheel.with_suffix(".trim")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(trimmed, "w", zipfile.ZIP_DEFLATED) as dst:
        kept = {n for n in src.namelist() if keep(n)}
        for name in sorted(kept):
            data = src.read(name)
            if name.endswith(".dist-info/RECORD"):  # list only what is still there
                data = "".join(line + "\n" for line in data.decode().splitlines()
                               if line.split(",")[0] in kept).encode()
            dst.writestr(name, data)
    trimmed.replace(wheel)


# -- the run (on the GPU machine) -------------------------------------------------------------------------


def chat_record(rng: random.Random, turns: int) -> dict:
    from trainer_fixtures.tiny_model import chat_record as one_turn

    messages = []
    for _ in range(turns):
        messages += one_turn(rng.choice(_things()), rng)["messages"]
    return {"messages": messages}


def _things():
    from trainer_fixtures.tiny_model import THINGS

    return THINGS


def build_base(dest: Path, size: str, device: str):
    import torch
    from trainer_fixtures.tiny_model import build_tokenizer
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = build_tokenizer(dest)  # word-level, with a chat template; built here, no hub
    shape = QWEN25_15B if size == "1.5b" else TINY
    config = Qwen2Config(**shape, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(str(dest), safe_serialization=True)
    params = sum(p.numel() for p in model.parameters())
    del model
    return params


def run(args) -> int:
    import boto3
    import torch
    from boto3.s3.transfer import TransferConfig
    from moto.server import ThreadedMotoServer
    from qlora_api import TrainerProgressLine
    from qlora_api.protocol import parse_termination_message

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    out = Path(os.environ.get("OUT", tempfile.mkdtemp(prefix="bench-out-")))
    work = Path(tempfile.mkdtemp(prefix="bench-"))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    timings = {}
    clock = time.monotonic()

    def lap(name):
        nonlocal clock
        timings[name] = round(time.monotonic() - clock, 1)
        clock = time.monotonic()
        print(f"[bench] {name}: {timings[name]} s", flush=True)

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    creds = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
    os.environ.update(creds)
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    for bucket in ("models", "datasets", "adapters"):
        s3.create_bucket(Bucket=bucket)

    params = build_base(work / "base", args.size, device)
    lap("build base")
    transfer = TransferConfig(multipart_threshold=64 << 20, multipart_chunksize=64 << 20, max_concurrency=8)
    for path in sorted((work / "base").iterdir()):
        s3.upload_file(str(path), "models", f"qwen2.5-1.5b-shape/{path.name}", Config=transfer)
    lap("upload base to S3")

    rng = random.Random(0)
    train = [chat_record(rng, args.turns) for _ in range(args.records)]
    held_out = [chat_record(rng, args.turns) for _ in range(args.eval_records)]
    for key, records in (("train.jsonl", train), ("eval.jsonl", held_out)):
        s3.put_object(Bucket="datasets", Key=f"bench/{key}", Body="\n".join(json.dumps(r) for r in records).encode())

    config = {
        "namespace": "bench", "name": "qwen-shape", "runId": "gpu-1",
        "spec": {
            "model": {"uri": "s3://models/qwen2.5-1.5b-shape/"},
            "dataset": {"uri": "s3://datasets/bench/train.jsonl", "evalUri": "s3://datasets/bench/eval.jsonl"},
            "output": {"bucket": "adapters", "endpointUrl": endpoint, "addressingStyle": "path"},
            "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "targetModules": ["all-linear"]},
            "training": {"maxSteps": args.steps, "learningRate": args.lr, "batchSize": args.batch_size,
                         "gradientAccumulationSteps": args.grad_accum, "maxSeqLength": args.seq_len,
                         "loggingSteps": max(1, args.steps // 10), "warmupSteps": 3,
                         "checkpointSteps": args.steps // 2},
        },
    }
    (work / "config.json").write_text(json.dumps(config))
    env = {**os.environ, **creds, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO / "operator"), str(REPO / "trainer_image"),
                                          os.environ.get("PYTHONPATH", "")])}
    # Straight into $OUT, so that a run cut short by the time limit still leaves its reports.
    with open(out / "trainer-stderr.log", "w") as stderr, open(out / "trainer-stdout.jsonl", "w") as stdout:
        proc = subprocess.run([sys.executable, "-m", "qlora_trainer", "--config", str(work / "config.json"),
                               "--termination-log", str(work / "termination-log"), "--workdir", str(work / "run")],
                              stdout=stdout, stderr=stderr, env=env, check=False)
    lap("trainer CLI (download, quantize, eval, train, eval, publish)")
    termination = work / "termination-log"
    message = parse_termination_message(termination.read_text() if termination.exists() else None)
    if proc.returncode != 0 or message is None or message.event != "result":
        print((out / "trainer-stderr.log").read_text()[-4000:])
        print(f"trainer failed: rc={proc.returncode} {message}")
        return 1
    result = message.result
    lines = (out / "trainer-stdout.jsonl").read_text().splitlines()
    progress = [p for p in map(TrainerProgressLine.parse, lines) if p]
    steady = progress[1:] or progress  # the first report includes compilation and warm-up
    train_losses = [p.loss for p in progress if p.loss is not None]

    # Round trip: the published adapter, from S3, against its manifest, loaded again.
    adapter = work / "downloaded"
    prefix = "bench/qwen-shape/gpu-1/"
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="adapters", Prefix="adapters/" + prefix)["Contents"]
            if "/checkpoints/" not in o["Key"]]
    for key in keys:
        dest = adapter / key[len("adapters/" + prefix):]
        dest.parent.mkdir(parents=True, exist_ok=True)
        s3.download_file("adapters", key, str(dest))
    manifest = json.loads((adapter / "manifest.json").read_bytes())
    manifest_ok = all(hashlib.sha256((adapter / f["path"]).read_bytes()).hexdigest() == f["sha256"]
                      for f in manifest["files"])
    manifest_ok &= hashlib.sha256((adapter / "manifest.json").read_bytes()).hexdigest() == result.manifest_sha256
    lap("download adapter")
    reload_4bit, base_bf16, reload_bf16 = reload_losses(work / "base", adapter, held_out, args)
    lap("reload on 4-bit and bf16 bases")
    server.stop()

    metrics = json.loads((adapter / "metrics.json").read_text())
    trainer_phases = json.loads((adapter / "training_config.json").read_text()).get("phases", {})
    gpu = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    rows = [
        ("device", gpu),
        ("model", f"Qwen2.5-1.5B shape, random init, {params / 1e9:.2f}B params" if args.size == "1.5b"
         else f"tiny Qwen2 shape, {params / 1e6:.2f}M params"),
        ("run", (f"{args.steps} steps x {args.batch_size} x {args.grad_accum} accum x {args.seq_len} tokens "
                 "(packed), NF4 + double quant, LoRA r16 all-linear; the memory plan's micro-batch, recompute and "
                 "optimizer (trainer log)")),
        ("tokens/s (steady, mean of reports)", _mean([p.tokens_per_second for p in steady])),
        ("tokens/s (whole training)", _round(metrics.get("tokens_per_second"))),
        ("MFU (4N FLOPs/token, bf16 peak)", _mean([p.mfu for p in steady])),
        ("peak GPU memory GiB (training)", _round(metrics.get("peak_gpu_memory_gib"))),
        ("train seconds", result.train_seconds),
        ("train loss, first -> last report", " -> ".join(f"{x:.4f}" for x in (train_losses[:1] + train_losses[-1:]))),
        ("eval loss before -> after", f"{result.eval_loss_before:.4f} -> {result.eval_loss_after:.4f}"),
        ("perplexity before -> after", f"{result.perplexity_before:.1f} -> {result.perplexity_after:.2f}"),
        ("published", (f"{len(result.files)} files, {result.total_bytes / 1e6:.1f} MB, manifest sha256 "
                       f"{'matches' if manifest_ok else 'MISMATCH'}")),
        ("adapter from S3 on 4-bit base: eval loss", f"{reload_4bit:.4f} (trainer said {result.eval_loss_after:.4f})"),
        ("adapter from S3 on bf16 base: eval loss", f"{reload_bf16:.4f} (bf16 base alone {base_bf16:.4f})"),
        ("phase seconds", ", ".join(f"{k} {v}" for k, v in timings.items())),
        ("trainer phases (training_config.json), s", ", ".join(
            f"{k} {trainer_phases['byPhase'][k]['seconds']:.1f}" for k in trainer_phases.get("order", []))),
    ]
    # The training loss must fall with the eval loss: a training forward that missed the optimizer's
    # updates once reported a flat training loss beside a falling eval loss.
    ok = (manifest_ok and result.eval_loss_after < result.eval_loss_before and reload_bf16 < base_bf16
          and len(train_losses) >= 2 and train_losses[-1] < 0.8 * train_losses[0]
          and abs(reload_4bit - result.eval_loss_after) < 0.05 * result.eval_loss_after)
    table = "\n".join(f"| {k} | {v} |" for k, v in [("what", "value"), ("---", "---"), *rows])
    table += f"\n\nround trip and learning checks: {'PASS' if ok else 'FAIL'}"
    (out / "table.md").write_text(table + "\n")
    print(table)
    return 0 if ok else 1


def reload_losses(base_dir: Path, adapter_dir: Path, records: list, args) -> tuple[float, float, float]:
    import torch
    from peft import PeftModel
    from qlora_api.spec import TrainingSpec
    from qlora_trainer import data, evaluation
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(str(adapter_dir))
    spec = TrainingSpec(maxSeqLength=args.seq_len)
    rows = data.build_examples([data.Record(f"eval {i}", "messages", r) for i, r in enumerate(records)],
                               tokenizer, spec, "eval")
    collator = data.Collator(tokenizer.pad_token_id, packed=True)
    place = {"": 0} if cuda else "cpu"

    def loss(model):
        model.config.use_cache = False
        return evaluation.eval_loss(model, rows, collator, args.batch_size, dtype)

    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=dtype)
    quantized = AutoModelForCausalLM.from_pretrained(str(base_dir), quantization_config=nf4, device_map=place,
                                                     dtype=dtype)
    reload_4bit = loss(PeftModel.from_pretrained(quantized, str(adapter_dir)))
    del quantized
    if cuda:
        torch.cuda.empty_cache()
    plain = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=dtype, device_map=place)
    base_loss = loss(plain)
    reload_plain = loss(PeftModel.from_pretrained(plain, str(adapter_dir)))
    return reload_4bit, base_loss, reload_plain


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _round(value, digits=2):
    return None if value is None else round(value, digits)


def _mean(values):
    values = [v for v in values if v is not None]
    return round(sum(values) / len(values), 4 if values and max(values) < 1 else 1) if values else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    wheels = sub.add_parser("wheels", help="download and trim the wheels for the GPU machine")
    wheels.add_argument("--cuda", default="130", help="CUDA version of the GPU machine's torch (cu130)")
    bench = sub.add_parser("run", help="run the benchmark (on the GPU machine)")
    bench.add_argument("--size", choices=["1.5b", "tiny"], default="1.5b")
    bench.add_argument("--steps", type=int, default=40)
    bench.add_argument("--batch-size", type=int, default=4)
    bench.add_argument("--grad-accum", type=int, default=2)
    bench.add_argument("--seq-len", type=int, default=2048)
    bench.add_argument("--lr", type=float, default=1e-3)
    bench.add_argument("--records", type=int, default=3000)
    bench.add_argument("--eval-records", type=int, default=64)
    bench.add_argument("--turns", type=int, default=6, help="question/answer pairs per conversation")
    args = parser.parse_args()
    if args.command == "wheels":
        prepare_wheels(args.cuda)
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
