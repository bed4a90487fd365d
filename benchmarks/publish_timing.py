"""The trainer's publish phase taken apart on the CPU, against the floor of the same bytes into the same store.

An adapter folder the size of the CLI benchmark's rows (LoRA r=16 on q, k, v, o, gate, up, down;
`8b`: 32 layers of Llama-3-8B, 41.9M bf16 parameters, 84 MB; `1.5b`: 28 layers of Qwen2.5-1.5B,
37 MB) with peft's and the tokenizer's small files beside it goes to a store in another process,
as in trainer_cli_speed.py: moto (the CLI benchmark's store) or a private MinIO (`--store minio`).
Each repeat, on fresh run folders:
- `publish`: publishing.publish_once's own `publish` phase (claim, hash, upload), as the CLI logs it;
- its steps one by one: the claim (four small requests), sha256 of every file, and the upload of
  every file with the trainer's transfer settings (storage.upload_transfer) and with the old
  fixed 64 MiB parts;
- the floor, trainer_cli_speed.publish_floor: the files publish_once uploaded, into the same store
  with plain boto3 and no hashing or claim, in the trainer's parts (the floor) and as one PUT per
  file (beside it).
The table reports the minimum over the repeats (the machine is shared) and the median.

    python benchmarks/publish_timing.py --shape 8b --store moto --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for folder in ("operator", "trainer_image", "tests", "benchmarks"):
    sys.path.insert(0, str(REPO / folder))

MiB = 1 << 20
# hidden, intermediate, key/value width, layers
SHAPES = {"8b": (4096, 14336, 1024, 32), "1.5b": (1536, 8960, 256, 28)}
RANK = 16
PARTS = "trainer's parts"  # publish_floor's names for its two ways


def write_adapter(shape: str, folder: Path) -> Path:
    """adapter_model.safetensors with peft's tensor names and shapes, and the small files beside it."""
    import torch
    from safetensors.torch import save_file

    hidden, inter, kv, layers = SHAPES[shape]
    dims = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (hidden, kv), "self_attn.v_proj": (hidden, kv),
            "self_attn.o_proj": (hidden, hidden), "mlp.gate_proj": (hidden, inter), "mlp.up_proj": (hidden, inter),
            "mlp.down_proj": (inter, hidden)}
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for layer in range(layers):
        for module, (fan_in, fan_out) in dims.items():
            stem = f"base_model.model.model.layers.{layer}.{module}"
            tensors[f"{stem}.lora_A.weight"] = torch.randn(RANK, fan_in, generator=gen).to(torch.bfloat16)
            tensors[f"{stem}.lora_B.weight"] = torch.randn(fan_out, RANK, generator=gen).to(torch.bfloat16)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps(
        {"r": RANK, "lora_alpha": 32, "target_modules": [m.split(".")[-1] for m in dims], "peft_type": "LORA",
         "base_model_name_or_path": ""}))
    (folder / "README.md").write_text("# adapter\n" * 50)
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 8192, "pad": "x" * 2000}))
    (folder / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    (folder / "tokenizer.json").write_bytes(os.urandom(300_000).hex().encode())
    return folder


def serve_moto(port: int) -> None:
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False).start()
    print("ready", flush=True)
    sys.stdin.read()  # until the parent closes our stdin


def best(xs: list[float]) -> str:
    return f"{min(xs):.3f} (median {statistics.median(xs):.3f})"


def measure(server, adapter: Path, repeats: int) -> dict:
    from boto3.s3.transfer import TransferConfig
    from qlora_api import TrainingResult
    from qlora_api.spec import OutputSpec
    from qlora_trainer import publishing
    from qlora_trainer.phases import PhaseClock
    from qlora_trainer.publishing import RunLocation, files_under, sha256_file
    from qlora_trainer.storage import TRANSFER, S3Storage, upload_transfer
    from trainer_cli_speed import publish_floor

    os.environ.update(server.env)
    storage = S3Storage(OutputSpec(bucket="adapters", endpoint_url=server.endpoint, addressing_style="path"))
    client = storage.client
    files = files_under(adapter)
    old = TransferConfig(multipart_threshold=64 * MiB, multipart_chunksize=64 * MiB, max_concurrency=8)
    times: dict[str, list[float]] = {}

    def timed(name, call):
        began = time.perf_counter()
        value = call()
        times.setdefault(name, []).append(time.perf_counter() - began)
        return value

    for i in range(repeats):
        run = RunLocation.of("adapters", "timing", "bench", "publish", f"run-{i}-{time.time_ns()}")
        clock = PhaseClock()
        publishing.publish_once(storage, run, adapter, {"run": "config"}, {"steps": 1},
                                TrainingResult(adapter_uri=run.uri), phases=clock)
        times.setdefault("publish (the phase)", []).append(next(p.seconds for p in clock.done if p.name == "publish"))
        side = RunLocation.of("adapters", "timing", "bench", "steps", f"run-{i}-{time.time_ns()}")
        timed("  claim", lambda side=side: publishing.claim_publication(storage, side, 1))
        timed("  sha256 of every file", lambda: [sha256_file(p) for p in files.values()])
        timed("  upload, the trainer's parts", lambda side=side: [
            storage.upload_file(p, side.root.join("new", rel)) for rel, p in files.items()])
        timed("  upload, fixed 64 MiB parts", lambda side=side: [client.upload_file(
            str(p), "adapters", side.root.join("old", rel).key, Config=old) for rel, p in files.items()])

        # the CLI benchmark's own floor, on the files this repeat's publish_once uploaded
        floor = publish_floor(server.endpoint, run.uri, adapter.parent / "floor", repeats=1)
        for strategy, seconds in floor["by_strategy"].items():
            times.setdefault(f"floor: {strategy}", []).append(seconds)
    sizes = {rel: p.stat().st_size for rel, p in files.items()}
    big = max(sizes.values())
    return {"times": times, "bytes": sum(sizes.values()), "files": len(sizes), "largest": big,
            "parts_now": -(-big // upload_transfer(TRANSFER, big).multipart_chunksize)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    ap.add_argument("--store", choices=("moto", "minio"), default="moto")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--serve-moto", type=int, help=argparse.SUPPRESS)
    opts = ap.parse_args()
    if opts.serve_moto:
        serve_moto(opts.serve_moto)
        return 0
    from trainer_fixtures.s3_server import S3Server, free_port

    work = Path(tempfile.mkdtemp(prefix="publish-timing-"))
    adapter = write_adapter(opts.shape, work / "adapter")
    if opts.store == "moto":  # in a process of its own, as the CLI benchmark's store is to the trainer
        port = free_port()
        proc = subprocess.Popen([sys.executable, __file__, "--serve-moto", str(port)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)
        proc.stdout.readline()
        server, stop = S3Server(f"http://127.0.0.1:{port}", "bench", "bench"), proc.stdin.close
    else:
        from trainer_fixtures.minio_server import MinioProcess

        minio = MinioProcess(work / "minio")
        server, stop = minio.start(), minio.stop
    try:
        server.make_bucket("adapters")
        result = measure(server, adapter, opts.repeats)
    finally:
        stop()
        shutil.rmtree(work, ignore_errors=True)
    print(f"{opts.shape} adapter: {result['files']} files, {result['bytes'] / 1e6:.1f} MB (largest "
          f"{result['largest'] / 1e6:.1f} MB, {result['parts_now']} part(s) with the trainer's settings); "
          f"store {opts.store}; seconds, best of {opts.repeats}")
    print("| step | s |\n|---|---|")
    for name, xs in result["times"].items():
        print(f"| {name} | {best(xs)} |")
    phase = min(result["times"]["publish (the phase)"])
    print(f"publish / floor (the trainer's parts): {phase / min(result['times']['floor: ' + PARTS]):.2f}x; "
          f"/ one PUT per file: {phase / min(result['times']['floor: one PUT']):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
