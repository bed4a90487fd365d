"""The real trainer CLI against the benchmark's fast path and against floors, in one device call.

For each row (the benchmark's shapes: Qwen2.5-1.5B at 2048 x 8 on fixed-length rows and on packed
variable-length records, Qwen2.5-7B and Llama-3-8B at 1024 x 4) it measures, in the same call:
- the trainer CLI (`python -m qlora_trainer`, what a QLoRAJob runs): steady tokens/s (mean of its
  progress reports after the first) and its phases (TrainerPhaseLine on stdout);
- the benchmark's own fast-path number for the row (speed_vs_unsloth.run_fixed / run_varlen, engine
  `ours`, in a process of its own): target CLI >= 95% of it;
- floors for the phases outside training: the store's download bandwidth (boto3 in another process,
  the trainer's transfer settings, same server, same disk), its upload bandwidth (a sample of the
  checkpoint through boto3), the quantize phase's own work at bitsandbytes' and the bus's rates
  (every tensor read from the checkpoint and placed on the device, the linear weights quantized
  with quantize_4bit, the other tensors cast to fp32 as prepare_model_for_kbit_training does; the
  device's first-use costs paid before the clock, as the trainer pays them on a thread while it
  downloads), the import time of torch & co. in a fresh process, and a batched tokenizer pass over
  the same texts (train and eval) on the tokenizer's threads: target each phase within 1.5x its
  floor. The import and quantization floors are taken at the start of the fast-path row's own
  fresh process (before it loads anything), which saves a process start per shape. The quantize
  phase is also shown step by step (its sub-phases fromPretrained, prepareKbit) beside the floor's
  parts (read, place, quantize, cast), and the start-up thread's own time (imports, then the GPU's
  warm-up; startup_thread.py) beside what the startup phase waited for it.

No full bf16 checkpoint is ever held in memory: random weights are drawn one decoder layer at a time
(on the GPU when there is one) and written as one safetensors shard per layer with an index, every
shape by a process of its own, side by side, in memory (/dev/shm) while they fit there and on the
disk otherwise; rows of the same shape share it. The 1.5B model of the first row goes through the
S3 server (moto, in this process) so that the download phase is real: it is put there as soon as
its checkpoint is written, while the larger ones are still being written; the other rows read
their model from a local folder as a pvc:// model (no download phase); with --no-download the 1.5B
row does too. Rows run in --only's order; a row that would not end within --budget-s (by its
estimate, ROW_ESTIMATE_S) is reported as skipped: run it with --only in a second call.

    # here: the wheels the GPU machine lacks (into .whl/trainer/), as for gpu_trainer_e2e.py
    python benchmarks/gpu_trainer_e2e.py wheels
    # on the GPU machine, one call (carry .whl):
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \\
        --target /tmp/site .whl/trainer/*.whl
    PYTHONPATH=/tmp/site python3 benchmarks/trainer_cli_speed.py --out $OUT
    # a rehearsal of every step on a CPU with a tiny shape (seconds):
    python benchmarks/trainer_cli_speed.py --dry-run
"""

from __future__ import annotations

import argparse
import json
import os
import random
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

ROOT = Path("/dev/shm/qlora-cli-bench") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir()) / "qlora-cli-bench"
CLAIM = "models"  # pvc://models/<shape>: QLORA_PVC_ROOT is ROOT, so the folder is ROOT/models/<shape>
TARGET_SPEED = 0.95
TARGET_PHASE = 1.5
# Seconds a row takes on the H200 (fast-path process, CLI, data and floors), fixed + per CLI step,
# for the budget: a row starts only if it should end inside --budget-s. From the session-9 call
# (rows of 96 s with the download, 72 s and 70 s at 20 steps; `row_s` in results.json), with a few
# seconds of margin; varlen from session 8 (~75 s); an s3 row adds its download floor and phase.
ROW_ESTIMATE_S = {"1.5b-2048": (64, 0.5), "varlen": (62, 0.8), "7b-1024": (60, 0.6), "8b-1024": (62, 0.6)}
# Session 10's diagnostics beside the quantize floor (a second floor pass, the pinned-staging floor,
# the trainer's own load three times) in the first row of a shape, by its parameters (billions).
DIAGNOSTICS_S_PER_B = 4.0  # the session-10 1.5B row took 132 s with them and the fresh tokenize floor
FRESH_TOKENIZE_FLOOR_S = 20
PUBLISH_FLOOR_S = 5  # publish_floor: a light process (no torch), the adapter down once and up twice per way
S3_ROW_EXTRA_S = 72  # the download floor, the CLI's download, the quantize floor on a downloaded copy (three processes)
UPLOAD_SAMPLE_BYTES = 500 << 20
QUANTIZE_STEPS = ("fromPretrained", "prepareKbit", "prepareSharded")  # sub-phases of quantize

TINY = {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512,
        "max_position_embeddings": 4096, "tie_word_embeddings": True, "rope_theta": 1e6, "rms_norm_eps": 1e-6,
        "hidden_act": "silu"}
# name: the benchmark's row (speed_vs_unsloth.ROWS, or "varlen"), shape, sequence length, batch, accumulation,
# data (fixed: every record exactly seq tokens; varlen: the benchmark's length mix, packed), model store
ROWS = {
    "1.5b-2048": dict(bench="1.5b-2048", shape="qwen2.5-1.5b", seq=2048, batch=8, accum=1, data="fixed", store="s3"),
    "varlen": dict(bench="varlen", shape="qwen2.5-1.5b", seq=2048, batch=8, accum=2, data="varlen", store="pvc"),
    "7b-1024": dict(bench="7b-1024", shape="qwen2.5-7b", seq=1024, batch=4, accum=1, data="fixed", store="pvc"),
    "8b-1024": dict(bench="8b-1024", shape="llama-3-8b", seq=1024, batch=4, accum=1, data="fixed", store="pvc"),
}
DRY_ROWS = {
    "tiny-fixed": dict(bench=None, shape="tiny", seq=64, batch=4, accum=1, data="fixed", store="s3"),
    "tiny-varlen": dict(bench=None, shape="tiny", seq=64, batch=4, accum=2, data="varlen", store="pvc"),
}


def shapes() -> dict:
    from speed_vs_unsloth import SHAPES

    return {**SHAPES, "tiny": TINY}


# -- the checkpoint, one layer at a time -------------------------------------------------------------------


def write_checkpoint(shape: str, folder: Path) -> None:
    """Random bf16 weights of the shape, one safetensors shard per decoder layer (plus one for the
    embeddings and one for the head and final norm), with the index transformers reads."""
    import torch
    from safetensors.torch import save_file
    from trainer_fixtures.tiny_model import build_tokenizer
    from transformers import AutoConfig, AutoModelForCausalLM

    if (folder / ".done").exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(folder)
    cfg = dict(shapes()[shape], dtype="bfloat16", bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    config = AutoConfig.for_model(**cfg)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config)
    groups: dict[str, list[tuple[str, torch.Size]]] = {}
    for key, p in meta.state_dict().items():
        if config.tie_word_embeddings and key == "lm_head.weight":
            continue
        parts = key.split(".")
        group = f"layer{int(parts[2]):03d}" if parts[:2] == ["model", "layers"] else (
            "embed" if "embed_tokens" in key else "head")
        groups.setdefault(group, []).append((key, p.shape))
    del meta
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device=device).manual_seed(0)
    names = sorted(groups)
    weight_map = {}
    for i, group in enumerate(names):
        shard = f"model-{i + 1:05d}-of-{len(names):05d}.safetensors"
        tensors = {}
        for key, shp in groups[group]:
            if len(shp) == 1:  # norms (ones) and biases (zeros)
                t = torch.ones(shp, dtype=torch.bfloat16) if "norm" in key else torch.zeros(shp, dtype=torch.bfloat16)
            else:
                t = torch.randn(shp, generator=g, device=device, dtype=torch.bfloat16).mul_(0.02).cpu()
            tensors[key] = t
            weight_map[key] = shard
        save_file(tensors, str(folder / shard), metadata={"format": "pt"})
        del tensors
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config.save_pretrained(folder)
    (folder / ".done").write_text("ok")


def checkpoint_bytes(shape: str) -> int:
    """Bytes of the shape's bf16 checkpoint (from its config: attention with biases as in Qwen2)."""
    c = shapes()[shape]
    h, i, layers, vocab = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    kv = c["num_key_value_heads"] * h // c["num_attention_heads"]
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + h + 2 * kv + 2 * h
    return 2 * (layers * per_layer + vocab * h * (1 if c.get("tie_word_embeddings") else 2) + h)


def place_checkpoints(needed: list[str], downloaded: list[str]) -> dict:
    """Each shape's folder: in ROOT (memory, /dev/shm) while the checkpoints fit there with room for
    the CLI's and the floor's downloads; the rest on the disk with far more room, linked from
    ROOT/models/<shape> (the page cache keeps what was just written, as it keeps a download)."""
    import shutil as sh

    (ROOT / CLAIM).mkdir(parents=True, exist_ok=True)
    disk = Path(tempfile.gettempdir()) / "qlora-cli-bench-disk"
    free = sh.disk_usage(ROOT).free
    # room for the downloaded models' two copies (the CLI's and the floor's) and a margin
    spare = 2 * sum(checkpoint_bytes(s) for s in downloaded) + (2 << 30)
    places = {"shm_free_gb": round(free / 1e9, 1), "disk_free_gb": round(sh.disk_usage(tempfile.gettempdir()).free / 1e9, 1)}
    for shape in needed:
        link = ROOT / CLAIM / shape
        size = checkpoint_bytes(shape)
        if link.exists():
            places[shape] = "kept"
            continue
        if link.is_symlink():  # a link left by an earlier run to a folder since removed
            link.unlink()
        if free - size > spare:
            free -= size
            places[shape] = f"memory, {size / 1e9:.1f} GB"
        else:
            target = disk / shape
            target.mkdir(parents=True, exist_ok=True)
            link.symlink_to(target, target_is_directory=True)
            places[shape] = f"disk, {size / 1e9:.1f} GB"
    print(f"[cli-bench] checkpoints: {places}", flush=True)
    return places


def checkpoint_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


# -- floors (each in a process of its own, like the CLI) ------------------------------------------------------


def download_floor(endpoint: str, prefix: str, dest: Path, keep: bool = False) -> dict:
    """The store's download bandwidth: boto3 with the trainer's transfer settings, file by file
    (the copy removed afterwards unless `keep`)."""
    import boto3
    from qlora_trainer.storage import TRANSFER

    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    objects = s3.list_objects_v2(Bucket="models", Prefix=prefix)["Contents"]
    t = time.perf_counter()
    for o in objects:
        path = dest / o["Key"][len(prefix):]
        path.parent.mkdir(parents=True, exist_ok=True)
        s3.download_file("models", o["Key"], str(path), Config=TRANSFER)
    seconds = time.perf_counter() - t
    total = sum(o["Size"] for o in objects)
    if not keep:
        shutil.rmtree(dest, ignore_errors=True)
    return {"seconds": seconds, "bytes": total, "megabytes_per_second": total / 1e6 / seconds}


def quantize_floor_downloaded(endpoint: str, prefix: str, dest: Path, folder: Path) -> dict:
    """Where a downloaded model's quantize phase loses against the floor (session 25: 1.72x at the
    1.5B row through the store, 1.18x on the same checkpoint as pvc://). In this process: the model
    downloaded as the trainer downloads it, the floor on that copy, then on the original; the caller
    also takes the floor on the copy in a fresh process. The copy's pages or the download's process?"""
    download = download_floor(endpoint, prefix, dest, keep=True)
    return {"download_s": download["seconds"], "on_copy_after_download": quantize_floor(dest)["seconds"],
            "on_original_after_download": quantize_floor(folder)["seconds"]}


def quantize_floor(folder: Path) -> dict:
    """The quantize phase's own work at bitsandbytes' and the bus's rates: every tensor of the
    shards read into memory and placed on the device, the linear weights quantized to NF4 with
    double quantization, every other tensor cast to fp32 (what prepare_model_for_kbit_training
    does to the frozen floats), nothing else: no module tree, no per-parameter bookkeeping.
    The device's one-off costs (the CUDA context, bitsandbytes' and the cast's first kernels) are
    paid before the clock starts, as the trainer pays them on a thread while it downloads
    (startup_thread.py). `parts`: host-side seconds of each step (the placement also waits for the
    quantizations queued before it; the end's synchronisation is counted with quantize)."""
    import bitsandbytes.functional as bnbf
    import torch
    from safetensors import safe_open

    device = "cuda" if torch.cuda.is_available() else "cpu"
    warm = torch.ones(64, 64, dtype=torch.bfloat16, device=device)
    bnbf.quantize_4bit(warm, quant_type="nf4", compress_statistics=True)
    warm.float()
    if device == "cuda":
        torch.cuda.synchronize()
    params = 0
    parts = {"read": 0.0, "place": 0.0, "quantize": 0.0, "cast": 0.0}
    t = time.perf_counter()
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            for key in f.keys():
                a = time.perf_counter()
                w = f.get_tensor(key)
                b = time.perf_counter()
                w = w.to(device, non_blocking=False)
                c = time.perf_counter()
                params += w.numel()
                if w.dim() == 2 and "embed" not in key and "lm_head" not in key:
                    bnbf.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
                    parts["quantize"] += time.perf_counter() - c
                else:
                    w.float()
                    parts["cast"] += time.perf_counter() - c
                parts["read"] += b - a
                parts["place"] += c - b
    a = time.perf_counter()
    if device == "cuda":
        torch.cuda.synchronize()
    parts["quantize"] += time.perf_counter() - a
    seconds = time.perf_counter() - t
    return {"seconds": seconds, "params": params, "params_per_second": params / seconds,
            "parts": {k: round(v, 4) for k, v in parts.items()}}


_SAFETENSORS_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}


def quantize_floor_pinned(folder: Path, chunk_mb: int = 64, ring: int = 4) -> dict:
    """The same work as quantize_floor with the fastest placement found: each tensor's bytes read
    from the file (readinto, no page faults on a mapping) into a ring of pinned staging chunks and
    copied to the device without blocking the host, so the next read, the copies and the queued
    quantizations overlap. The pinned ring is allocated before the clock (`pin_s`): a loader
    would allocate it once, off its critical path."""
    import bitsandbytes.functional as bnbf
    import torch

    if not torch.cuda.is_available():
        return {"error": "no GPU"}
    warm = torch.ones(64, 64, dtype=torch.bfloat16, device="cuda")
    bnbf.quantize_4bit(warm, quant_type="nf4", compress_statistics=True)
    warm.float()
    a = time.perf_counter()
    chunk = chunk_mb << 20
    staging = [torch.empty(chunk, dtype=torch.uint8, pin_memory=True) for _ in range(ring)]
    done = [torch.cuda.Event() for _ in range(ring)]
    torch.cuda.synchronize()
    pin_s = time.perf_counter() - a
    params, k = 0, 0
    t = time.perf_counter()
    for shard in sorted(folder.glob("*.safetensors")):
        with open(shard, "rb", buffering=0) as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
            base = 8 + size
            for key, meta in header.items():
                if key == "__metadata__":
                    continue
                begin, end = meta["data_offsets"]
                dst = torch.empty(end - begin, dtype=torch.uint8, device="cuda")
                f.seek(base + begin)
                for off in range(0, end - begin, chunk):
                    n = min(chunk, end - begin - off)
                    slot = k % ring
                    done[slot].synchronize()  # the copy that last used this chunk has ended
                    view, got = memoryview(staging[slot].numpy())[:n], 0
                    while got < n:  # a read may return less than asked
                        got += f.readinto(view[got:])
                    dst[off:off + n].copy_(staging[slot][:n], non_blocking=True)
                    done[slot].record()
                    k += 1
                w = dst.view(getattr(torch, _SAFETENSORS_DTYPES[meta["dtype"]])).view(meta["shape"])
                params += w.numel()
                if w.dim() == 2 and "embed" not in key and "lm_head" not in key:
                    bnbf.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
                else:
                    w.float()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    del staging
    return {"seconds": seconds, "params": params, "params_per_second": params / seconds, "pin_s": round(pin_s, 3),
            "chunk_mb": chunk_mb, "ring": ring}


def trainer_load_in_process(folder: Path, repeats: int = 2) -> dict:
    """The trainer's own load_quantized_model (the phase's code: fromPretrained + prepareKbit) in
    this fresh process, after the floors, `repeats` times: its cost outside the CLI's process,
    the first time (the loader's first-use costs warmed first, as the CLI's warm-up thread does)
    and again. Each model is freed before the next."""
    import cProfile
    import gc
    import io
    import pstats

    import torch
    from qlora_api.spec import ModelSource, QuantizationSpec, TrainingSpec
    from qlora_trainer.model_loading import ModelFiles, load_quantized_model
    from qlora_trainer.startup_thread import warm_loader

    warm_loader()
    out, profile = [], None
    for i in range(repeats + 1):  # the last one under cProfile: where the seconds over the floor go
        profiler = cProfile.Profile() if i == repeats else None
        t = time.perf_counter()
        if profiler:
            profiler.enable()
        model = load_quantized_model(ModelFiles(folder, "bench"), ModelSource(uri="pvc://models/bench"),
                                     QuantizationSpec(), TrainingSpec())
        if profiler:
            profiler.disable()
            text = io.StringIO()
            pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(25)
            profile = text.getvalue()[-6000:]
        else:
            out.append(round(time.perf_counter() - t, 3))
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return {"seconds": out, "profile_by_tottime": profile}


def import_floor() -> dict:
    """What the CLI's startup phase must do at least: import torch & co. (first thing in a fresh process)."""
    t = time.perf_counter()
    import bitsandbytes  # noqa: F401
    import boto3  # noqa: F401
    import datasets  # noqa: F401
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    import trl  # noqa: F401

    return {"seconds": time.perf_counter() - t}


def tokenize_floor(folder: Path, texts: list[str], serial: bool = False) -> dict:
    """The tokenizer's own batched pass over the same texts (train and eval, as the CLI's phase) on
    its thread pool, whatever TOKENIZERS_PARALLELISM says here (the CLI also checks and packs).
    With `serial`, the same pass on one thread too (what the phase was before it used the pool)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    out = {}
    try:
        for setting in ("true", "false") if serial else ("true",):
            os.environ["TOKENIZERS_PARALLELISM"] = setting
            t = time.perf_counter()
            encoded = tokenizer(texts, add_special_tokens=True)["input_ids"]
            out["seconds" if setting == "true" else "serial_seconds"] = time.perf_counter() - t
    finally:
        if before is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before
    return {**out, "tokens": sum(map(len, encoded)), "threads": os.cpu_count()}


def upload_floor(s3, files: list[Path], prefix: str, transfer) -> dict:
    """The store's upload bandwidth: these files through boto3 with multipart uploads."""
    t = time.perf_counter()
    for path in files:
        s3.upload_file(str(path), "models", prefix + path.name, Config=transfer)
    seconds = time.perf_counter() - t
    total = sum(p.stat().st_size for p in files)
    return {"seconds": seconds, "bytes": total, "megabytes_per_second": total / 1e6 / seconds}


def publish_floor(endpoint: str, adapter_uri: str, dest: Path, repeats: int = 2) -> dict:
    """The publish phase's floor: the very files the phase uploaded (its manifest's, less the config
    and metrics written after it), the same bytes into the same store, by plain boto3 in a fresh
    process (the CLI's store is in another process too), with no hashing and no claim, and with the
    trainer's transfer settings (storage.upload_transfer's parts), as the download floor uses them;
    best of `repeats`. One PUT per file is timed beside it: on moto it is the faster (its multipart
    completion copies the object again, ~0.4 s of a 2-core CPU at 84 MB), on MinIO the slower, and
    on S3 one connection carries a fraction of what parts in flight do, so the trainer uses parts.
    The base's upload rate is from a 1 GB file in 64 MiB parts, whose per-object costs differ from
    an 84 MB adapter's."""
    import boto3
    from boto3.s3.transfer import TransferConfig
    from qlora_trainer.publishing import CONFIG, MANIFEST, METRICS
    from qlora_trainer.storage import TRANSFER, S3Uri, upload_transfer

    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    root = S3Uri.parse(adapter_uri)
    manifest = json.loads(s3.get_object(Bucket=root.bucket, Key=root.join(MANIFEST).key)["Body"].read())
    paths = [f["path"] for f in manifest["files"] if f["path"] not in (CONFIG, METRICS)]
    files = []
    for rel in paths:  # untimed: the bytes the phase uploaded, onto the work folder's file system
        path = dest / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        s3.download_file(root.bucket, root.join(rel).key, str(path))
        files.append((rel, path))
    one_put = TransferConfig(multipart_threshold=1 << 40, max_concurrency=TRANSFER.max_request_concurrency)
    best = {"one PUT": float("inf"), "trainer's parts": float("inf")}
    for i in range(repeats):
        for k, strategy in enumerate(best):
            t = time.perf_counter()
            for rel, path in files:
                config = one_put if strategy == "one PUT" else upload_transfer(TRANSFER, path.stat().st_size)
                s3.upload_file(str(path), root.bucket, f"publish-floor/{i}-{k}/{rel}", Config=config)
            best[strategy] = min(best[strategy], time.perf_counter() - t)
    total = sum(p.stat().st_size for _, p in files)
    shutil.rmtree(dest, ignore_errors=True)
    return {"seconds": best["trainer's parts"], "by_strategy": best, "bytes": total, "files": len(files)}


# -- the benchmark's fast-path number ----------------------------------------------------------------------


def fast_path_with_floors(row: dict, folder: Path, floors: bool, diagnostics: bool = True) -> dict:
    """In a fresh process: with `floors`, the import floor (first) and the quantization floor of
    the row's checkpoint (the GPU's cache emptied after it), then the row's fast-path number."""
    out = {}
    if floors:
        out["import_floor"] = import_floor()
        out["quantize_floor"] = quantize_floor(folder)
        if diagnostics:  # beside the floor (session 10): the best copy found, the phase's own code here
            try:
                out["quantize_floor"]["pinned"] = quantize_floor_pinned(folder)
                out["quantize_floor"]["again"] = quantize_floor(folder)["seconds"]
                out["quantize_floor"]["trainer_load"] = trainer_load_in_process(folder)
            except Exception as exc:  # noqa: BLE001  (a diagnostic must not cost the row)
                out["quantize_floor"]["diagnostics_error"] = repr(exc)[-500:]
        else:
            out["quantize_floor"]["diagnostics_error"] = "diagnostics off (--no-diagnostics)"
        import torch

        torch.cuda.empty_cache()  # the planner must see the memory the floor used as free
    return {**fast_path(row, folder), **out}


def memory_policy() -> str:
    """The memory plan's policy of every run in this call (--memory; the environment carries it to
    the rows' own processes): the CLI's spec.training.acceleration.memory and the fast path's plan."""
    from qlora_trainer.acceleration.planner import MEMORY_POLICIES

    policy = os.environ.get("QLORA_BENCH_MEMORY", "auto")
    if policy not in MEMORY_POLICIES:
        raise SystemExit(f"QLORA_BENCH_MEMORY must be one of {', '.join(MEMORY_POLICIES)}, got {policy!r}")
    return policy


def fast_path(row: dict, folder: Path) -> dict:
    """speed_vs_unsloth's own measurement of the row (engine ours, under memory_policy()) on a GPU;
    on a CPU (dry run) the plain recipe's steps through the same helpers, so the whole pipeline runs."""
    import speed_vs_unsloth as svu
    import torch

    if torch.cuda.is_available() and row["bench"]:
        svu.SHM = folder.parent  # the benchmark reads SHM/<shape>: our layer-by-layer checkpoint
        policy = {"policy": memory_policy()}
        if row["bench"] == "varlen":
            r = svu.run_varlen({"name": "varlen/ours", "engine": "ours", "row": "varlen", **policy})
            return {"tokens_per_s": r["useful_tokens_per_s"], "plan": r.get("plan")}
        r = svu.run_fixed({"name": f"{row['bench']}/ours", "engine": "ours", "row": row["bench"], **policy})
        return {"tokens_per_s": r["tokens_per_s"], "plan": r.get("plan"), "peak_gib": r.get("peak_gib")}
    model = svu.load_model("plain", folder, row["seq"], 0.05, device="cpu")
    params, opt = svu.make_optimizer(model, device="cpu")
    batches = svu._fixed_batches(model.config.vocab_size, row["batch"], row["seq"], row["accum"])
    times, _, tokens = svu.train_steps(model, params, opt, batches, 5, device="cpu", autocast=False)
    return {"tokens_per_s": statistics.median(t / s for t, s in zip(tokens[2:], times[2:])), "plan": "cpu plain"}


# -- the CLI run -----------------------------------------------------------------------------------------


def _exactly(tokenizer, words: list[str], n: int, rng: random.Random) -> str:
    """Text of the fixture's words that `tokenizer` (the one the trainer loads) turns into exactly n
    tokens, specials aside. Counted by the tokenizer itself: under a Qwen2 config transformers
    loads the fixture's word-level tokenizer as its Qwen2 class, which splits the same words into
    about 0.7 tokens each (the 1.5B row of the first H200 call trained on ~716-token records)."""
    count = lambda t: len(tokenizer(t, add_special_tokens=False)["input_ids"])  # noqa: E731
    size = n + n // 2 + 16
    while True:
        text = " ".join(rng.choices(words, k=size))
        offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        for k in [k for k in (n, n - 1, *range(n + 1, n + 8)) if k < len(offsets)]:
            cut = text[:offsets[k][1]]
            if count(cut) == n:
                return cut
        size *= 2


def _exactly_all(tokenizer, words: list[str], lengths: list[int], rng: random.Random) -> list[str]:
    """_exactly for every length in a few batched tokenizer calls (on the tokenizer's threads): each
    text cut at the end of a token near its n-th and counted again, the candidates in _exactly's
    order; the rare text no candidate fits is made one by one. Record by record (about four calls
    on ~30,000 characters each) the texts took tens of seconds of a device call."""
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    try:
        # tokens per word of this tokenizer (the fixture's words under a Qwen2 config: about a third)
        sample = " ".join(rng.choices(words, k=4096))
        per_word = len(tokenizer(sample, add_special_tokens=False)["input_ids"]) / 4096
        texts = [" ".join(rng.choices(words, k=int(1.25 * n / per_word) + 64)) for n in lengths]
        offsets = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        out: list[str | None] = [None] * len(texts)
        for shift in (0, -1, 1, 2, 3):
            todo = [i for i, text in enumerate(out) if text is None and 0 <= lengths[i] + shift < len(offsets[i])]
            cuts = [texts[i][:offsets[i][lengths[i] + shift][1]] for i in todo]
            counts = map(len, tokenizer(cuts, add_special_tokens=False)["input_ids"]) if cuts else []
            for i, cut, count in zip(todo, cuts, counts):
                if count == lengths[i]:
                    out[i] = cut
    finally:
        if before is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before
    return [text if text is not None else _exactly(tokenizer, words, n, rng) for text, n in zip(out, lengths)]


def texts_for(row: dict, n_steps: int, seed: int, tokenizer=None) -> list[str]:
    """Records of the fixture's words: exactly seq tokens with BOS and EOS for fixed rows; the
    benchmark's length mix for varlen, enough for n_steps of packed rows. Without `tokenizer`,
    one word is taken as one token (the fixture tokenizer's own rule)."""
    import speed_vs_unsloth as svu
    from trainer_fixtures.tiny_model import COLOURS, FILLER, THINGS

    words = THINGS + COLOURS + FILLER
    rng = random.Random(seed)
    if row["data"] == "fixed":
        lengths = [row["seq"] - 2] * (n_steps * row["batch"] * row["accum"])
    else:
        need = n_steps * row["batch"] * row["accum"] * row["seq"]
        lengths, total, k = [], 0, 0
        while total < need:
            if row["seq"] >= 2048:  # the benchmark's own mix (85% short, 15% up to 2048)
                more = svu._varlen_lengths(256, seed=seed + k, max_len=row["seq"])
            else:  # a tiny shape (dry run): uniform up to the row length
                more = [rng.randint(8, row["seq"]) for _ in range(256)]
            lengths += [n - 2 for n in more]
            total, k = sum(lengths), k + 1
    if tokenizer is not None:
        return _exactly_all(tokenizer, words, lengths, rng)
    return [" ".join(rng.choices(words, k=n)) for n in lengths]


def run_cli(name: str, row: dict, model_uri: str, endpoint: str, s3, steps: int, work: Path, folder: Path,
            timeout: float | None = None) -> dict:
    from qlora_api import TrainerPhaseLine, TrainerProgressLine
    from qlora_api.protocol import parse_termination_message
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))  # as the trainer will load it
    train = texts_for(row, steps, seed=0, tokenizer=tokenizer)
    held_out = texts_for(row, 1, seed=1, tokenizer=tokenizer)[:48]
    for key, texts in (("train", train), ("eval", held_out)):
        body = "\n".join(json.dumps({"text": t}) for t in texts).encode()
        s3.put_object(Bucket="datasets", Key=f"{name}/{key}.jsonl", Body=body)
    config = {
        "namespace": "bench", "name": name.replace(".", "-"), "runId": f"cli-{int(time.time())}",
        "spec": {
            "model": {"uri": model_uri},
            "dataset": {"uri": f"s3://datasets/{name}/train.jsonl", "evalUri": f"s3://datasets/{name}/eval.jsonl"},
            "output": {"bucket": "adapters", "endpointUrl": endpoint, "addressingStyle": "path"},
            "lora": {"r": 16, "alpha": 32, "dropout": 0.05,
                     "targetModules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]},
            "training": {"maxSteps": steps, "learningRate": 2e-4, "batchSize": row["batch"],
                         "gradientAccumulationSteps": row["accum"], "maxSeqLength": row["seq"],
                         "packing": row["data"] == "varlen", "loggingSteps": max(1, steps // 6), "warmupSteps": 2,
                         "checkpointSteps": steps, "acceleration": {"memory": memory_policy()}},
        },
    }
    run_dir = work / f"cli-{name}"
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(config))
    t = time.perf_counter()
    with open(run_dir / "stdout.jsonl", "w") as out, open(run_dir / "stderr.log", "w") as err:
        try:
            rc = subprocess.run([sys.executable, "-m", "qlora_trainer", "--config", str(run_dir / "config.json"),
                                 "--termination-log", str(run_dir / "termination-log"), "--workdir",
                                 str(run_dir / "work")], stdout=out, stderr=err,
                                env=child_env(QLORA_PVC_ROOT=str(ROOT)), check=False, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = f"killed after {timeout:.0f} s (the call's budget)"
    wall = time.perf_counter() - t
    shutil.rmtree(run_dir / "work", ignore_errors=True)
    termination = run_dir / "termination-log"
    message = parse_termination_message(termination.read_text() if termination.exists() else None)
    lines = (run_dir / "stdout.jsonl").read_text().splitlines()
    progress = [p for p in map(TrainerProgressLine.parse, lines) if p]
    phases: dict[str, dict] = {}
    for p in filter(None, map(TrainerPhaseLine.parse, lines)):
        entry = phases.setdefault(p.phase, {"seconds": 0.0, "count": 0})
        entry["seconds"] += p.seconds
        entry["count"] += 1
        for q in ("bytes", "params", "tokens", "rows"):
            if getattr(p, q) is not None:
                entry[q] = entry.get(q, 0) + getattr(p, q)
    stderr = (run_dir / "stderr.log").read_text()
    adapter_uri = message.result.adapter_uri if message is not None and message.event == "result" else None
    steady = [p.tokens_per_second for p in progress[1:] if p.tokens_per_second] or \
             [p.tokens_per_second for p in progress if p.tokens_per_second]
    return {"rc": rc, "ok": rc == 0 and message is not None and message.event == "result",
            "adapter_uri": adapter_uri, "resolved": _resolved(s3, adapter_uri),
            "wall_s": round(wall, 2), "steady_tokens_per_s": round(statistics.mean(steady), 1) if steady else None,
            "reports": [p.tokens_per_second for p in progress], "phases": phases,
            "texts": train + held_out, "stderr_tail": stderr[-3000:],
            # the start-up thread's own time (imports, then the GPU's warm-up; startup_thread.py logs
            # it), beside what the startup phase waited for it
            "warmup_log": next((line[line.index("start-up (imports"):] for line in stderr.splitlines()
                                if "start-up (imports, device warm-up) took" in line), None),
            # which loader read the checkpoint (model_loading.choose_loader) and how far it read ahead
            "loader_log": [line[line.index("fromPretrained:"):] for line in stderr.splitlines()
                           if "fromPretrained:" in line]}


def _resolved(s3, adapter_uri: str | None) -> dict | None:
    """What the CLI's published training_config.json says it ran: its memory plan (the policy in
    it) and its fast path, read back from the store before the call's store goes away."""
    if not adapter_uri:
        return None
    bucket, _, prefix = adapter_uri.removeprefix("s3://").partition("/")
    try:
        body = s3.get_object(Bucket=bucket, Key=prefix.rstrip("/") + "/training_config.json")["Body"].read()
    except Exception as exc:  # noqa: BLE001  (a record, not the measurement)
        return {"error": repr(exc)[-300:]}
    resolved = json.loads(body).get("resolved", {})
    return {k: resolved.get(k) for k in ("memoryPlan", "acceleration", "batchSize", "gradientAccumulationSteps")}


# -- the driver ------------------------------------------------------------------------------------------


def child_env(**extra) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", TQDM_DISABLE="1", **extra)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / f) for f in ("operator", "trainer_image", "tests", "benchmarks")]
                                        + [p for p in (os.environ.get("PYTHONPATH", ""),) if p])
    return env


def in_child(task: str, *args: str, timeout: float = 300) -> dict:
    """One measurement in a fresh process (its own CUDA context and imports); the result is its last line."""
    proc = subprocess.run([sys.executable, __file__, "--task", task, *args], capture_output=True, text=True,
                          env=child_env(), timeout=timeout, check=False)
    if proc.returncode != 0:
        return {"error": proc.stderr[-1500:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def task_main(task: str, args: list[str]) -> None:
    if task == "checkpoint":
        write_checkpoint(args[0], Path(args[1]))
        result = {"ok": True}
    elif task == "download-floor":
        result = download_floor(args[0], args[1], Path(args[2]))
    elif task == "tokenize-floor":  # in a fresh process: the pass as the CLI's process first meets it
        result = tokenize_floor(Path(args[0]), json.loads(Path(args[1]).read_text()))
    elif task == "publish-floor":
        result = publish_floor(args[0], args[1], Path(args[2]))
    elif task == "quantize-floor":
        result = quantize_floor(Path(args[0]))
    elif task == "quantize-floor-downloaded":
        result = quantize_floor_downloaded(args[0], args[1], Path(args[2]), Path(args[3]))
    elif task == "fast-path":
        result = fast_path_with_floors(json.loads(args[0]), Path(args[1]), args[2].startswith("floors"),
                                       diagnostics=args[2] != "floors-lean")
    else:
        raise SystemExit(f"unknown task {task}")
    print(json.dumps(result), flush=True)


def drive(opts) -> int:
    import logging

    import boto3
    from boto3.s3.transfer import TransferConfig
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    rows = DRY_ROWS if opts.dry_run else ROWS
    # In --only's order (the rows a short budget must not drop first), else the table's.
    chosen = [r for r in opts.only.split(",") if r in rows] if opts.only else list(rows)
    steps = opts.steps or (6 if opts.dry_run else 30)
    out = Path(opts.out or os.environ.get("OUT") or tempfile.mkdtemp(prefix="cli-bench-out-"))
    out.mkdir(parents=True, exist_ok=True)
    # The work folder (the CLI's downloads, the floor's download) on the checkpoints' file system.
    ROOT.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="cli-bench-", dir=str(ROOT)))
    t0 = time.monotonic()
    deadline = t0 + opts.budget_s

    # Checkpoints (layer by layer, drawn on the GPU; one process per shape, side by side) while the S3
    # server starts; every timed step waits for them, so that no measurement shares the GPU, the CPUs
    # or memory bandwidth with them.
    needed = list(dict.fromkeys(rows[r]["shape"] for r in chosen))
    s3_shapes = [] if opts.no_download else list(dict.fromkeys(rows[r]["shape"] for r in chosen
                                                               if rows[r]["store"] == "s3"))
    results_env = {"checkpoint_places": place_checkpoints(needed, s3_shapes)}
    writers = {shape: subprocess.Popen([sys.executable, __file__, "--task", "checkpoints", shape], env=child_env())
               for shape in needed}

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    for bucket in ("models", "datasets", "adapters"):
        s3.create_bucket(Bucket=bucket)

    t = time.monotonic()
    transfer = TransferConfig(multipart_threshold=64 << 20, multipart_chunksize=64 << 20, max_concurrency=8)
    # The model the CLI downloads goes into the store as soon as its checkpoint is written, while the
    # larger ones are still being written (untimed: the upload floor is a sample, after them).
    staged: dict[str, float] = {}
    while time.monotonic() < deadline and (any(w.poll() is None for w in writers.values())
                                           or any(sh not in staged for sh in s3_shapes)):
        for shape in s3_shapes:
            folder = ROOT / CLAIM / shape
            if shape not in staged and (writers[shape].poll() is not None or (folder / ".done").exists()):
                began = time.monotonic()
                if (folder / ".done").exists():
                    for path in checkpoint_files(folder):
                        s3.upload_file(str(path), "models", f"{shape}/{path.name}", Config=transfer)
                staged[shape] = round(time.monotonic() - began, 1)
        time.sleep(0.2)
    results = {"rows": {}, "floors": {}, "env": {"python": sys.version.split()[0], "cpus": os.cpu_count(),
                                                 **results_env, "staged_s": staged},
               "options": {"only": opts.only, "steps": steps, "budget_s": opts.budget_s,
                           "no_download": opts.no_download, "no_diagnostics": opts.no_diagnostics,
                           "fresh_tokenize_floor": opts.fresh_tokenize_floor, "memory": memory_policy()},
               "checkpoints_s": round(time.monotonic() - t0, 1), "waited_for_checkpoints_s": round(time.monotonic() - t, 1)}
    uploaded: set[str] = set()
    floored: set[str] = set()
    for name in chosen:
        row = dict(rows[name], store="pvc") if opts.no_download else rows[name]
        folder = ROOT / CLAIM / row["shape"]
        fixed_s, per_step_s = ROW_ESTIMATE_S.get(name, (90, 0.6))
        estimate = 30 if opts.dry_run else fixed_s + per_step_s * steps + (S3_ROW_EXTRA_S if row["store"] == "s3" else 0)
        if not opts.dry_run and row["shape"] not in floored and not opts.no_diagnostics:
            estimate += DIAGNOSTICS_S_PER_B * checkpoint_bytes(row["shape"]) / 2e9
        fresh_floor = opts.fresh_tokenize_floor in ("all", name)
        if not opts.dry_run and fresh_floor:
            estimate += FRESH_TOKENIZE_FLOOR_S
        if not opts.dry_run:
            estimate += PUBLISH_FLOOR_S
        if not (folder / ".done").exists() or time.monotonic() + estimate > deadline:
            results["rows"][name] = {"error": f"skipped: checkpoint not ready or out of time (row estimate {estimate:.0f} s, "
                                              f"{deadline - time.monotonic():.0f} s left)"}
            continue
        res = {"row": row}
        row_began = time.monotonic()
        files = checkpoint_files(folder)
        if row["store"] == "s3" and row["shape"] not in uploaded:  # staged while the checkpoints were written
            results["floors"].setdefault("download", {})[row["shape"]] = in_child(
                "download-floor", endpoint, f"{row['shape']}/", str(work / "floor-download"))
            uploaded.add(row["shape"])
        if not results["floors"].get("upload"):  # the store's upload rate, from a sample of the checkpoint
            sample, size = [], 0
            for path in files:
                if size < UPLOAD_SAMPLE_BYTES or not sample:
                    sample.append(path)
                    size += path.stat().st_size
            results["floors"].setdefault("upload", {})[row["shape"]] = upload_floor(
                s3, sample, f"upload-sample/{row['shape']}/", transfer)
        model_uri = f"s3://models/{row['shape']}/" if row["store"] == "s3" else f"pvc://{CLAIM}/{row['shape']}"
        # The fast path in a fresh process; the first for a shape also measures the import and
        # quantization floors before it loads anything.
        floors_arg = ("floors-lean" if opts.no_diagnostics else "floors") if row["shape"] not in floored else "-"
        fast = in_child("fast-path", json.dumps(row), str(folder), floors_arg, timeout=240)
        if "import_floor" in fast:
            floored.add(row["shape"])
            results["floors"].setdefault("startup", fast.pop("import_floor"))
            results["floors"].setdefault("quantize", {})[row["shape"]] = fast.pop("quantize_floor")
        res["fast_path"] = fast
        cli = run_cli(name, row, model_uri, endpoint, s3, steps, work, folder,
                      timeout=max(60.0, deadline - time.monotonic() + 30))
        texts = cli.pop("texts")
        res["tokenize_floor"] = tokenize_floor(folder, texts)
        if cli.get("adapter_uri"):  # the same files into the same store, in a fresh process (~2 s at 8B)
            res["publish_floor"] = in_child("publish-floor", endpoint, cli["adapter_uri"], str(work / "publish-floor"))
        (work / "texts.json").write_text(json.dumps(texts))  # for the fresh-process floor
        if fresh_floor:  # a process start (~20 s on the H200 machine)
            res["tokenize_floor"]["fresh_process"] = in_child("tokenize-floor", str(folder), str(work / "texts.json"))
        if row["store"] == "s3":  # two process starts: the quantize floor on a downloaded copy
            copy = work / "quantize-download"
            res["quantize_download"] = in_child("quantize-floor-downloaded", endpoint, f"{row['shape']}/", str(copy),
                                                str(folder))
            res["quantize_download"]["on_copy_fresh_process"] = in_child("quantize-floor", str(copy)).get("seconds")
            res["quantize_download"]["on_original_fresh_process"] = in_child("quantize-floor", str(folder)).get("seconds")
            shutil.rmtree(copy, ignore_errors=True)
        res["cli"] = cli
        res["row_s"] = round(time.monotonic() - row_began, 1)  # what ROW_ESTIMATE_S estimates
        results["rows"][name] = res
        print(f"[cli-bench] {time.monotonic() - t0:6.1f}s {name}: cli {cli['steady_tokens_per_s']} tok/s, "
              f"fast path {_round(res['fast_path'].get('tokens_per_s'))}, rc {cli['rc']}", flush=True)
        (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    server.stop()
    for writer in writers.values():
        if writer.poll() is None:
            writer.kill()
    table, ok = render(results)
    (out / "table.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    print(table)
    if not opts.keep:
        shutil.rmtree(work, ignore_errors=True)
    # The dry run checks the machinery (every row ran, every phase has a floor), not CPU speed.
    return 0 if ok or opts.dry_run and all(r.get("cli", {}).get("ok") for r in results["rows"].values()) else 1


def _round(value, digits=1):
    return round(value, digits) if isinstance(value, (int, float)) else value


def _ratio(a, b):
    return a / b if a and b else None


def phase_rows(res: dict, floors: dict) -> list[tuple[str, float, float | None, str]]:
    """(phase, CLI seconds, floor seconds, what the floor is) for the phases that have one."""
    row, phases = res["row"], res["cli"]["phases"]
    out = []

    def add(phase, floor_s, what):
        if phase in phases:
            out.append((phase, phases[phase]["seconds"], floor_s, what))

    if floors.get("startup"):
        add("startup", floors["startup"]["seconds"], "import torch & co. in a fresh process")
    down = floors.get("download", {}).get(row["shape"])
    if down and "error" not in down and row["store"] == "s3":  # a pvc:// model is not downloaded
        add("downloadModel", down["seconds"], f"boto3 download, {down['megabytes_per_second']:.0f} MB/s")
    quant = floors.get("quantize", {}).get(row["shape"])
    if quant and "error" not in quant:
        add("quantize", quant["seconds"], f"read + place + bnb quantize_4bit + fp32 cast, {quant['params_per_second'] / 1e6:,.0f}M params/s")
    tok = res.get("tokenize_floor")
    if tok:
        serial = f"; on one thread {tok['serial_seconds']:.2f} s" if tok.get("serial_seconds") else ""
        fresh = tok.get("fresh_process") or {}
        what = f"batched fast-tokenizer pass, train + eval, {tok.get('threads')} CPUs"
        if fresh.get("seconds") and "tokenize" in phases:
            # The same conditions as the CLI's: the first large pass of a fresh process (which pays
            # its heap's growth, as the CLI's pass does); the driver's warm process beside it.
            add("tokenize", fresh["seconds"], f"{what}, as a fresh process's first pass; in the driver's warm "
                f"process {tok['seconds'] * 1e3:.1f} ms ({phases['tokenize']['seconds'] / tok['seconds']:.2f}x){serial}")
        else:
            add("tokenize", tok["seconds"], f"{what}{serial}")
    up = next(iter(floors.get("upload", {}).values()), None)
    same = res.get("publish_floor") or {}
    if up:
        rate = up["bytes"] / up["seconds"]
        for phase in ("checkpointUpload", "publish"):
            if phase == "publish" and same.get("seconds"):
                continue  # measured on its own files below
            if phase in phases and phases[phase].get("bytes"):
                add(phase, phases[phase]["bytes"] / rate, f"bytes at the base's upload rate, {rate / 1e6:.0f} MB/s")
    if same.get("seconds"):
        by = same.get("by_strategy", {})
        one_put, parts = by.get("one PUT", 0.0), by.get("trainer's parts", 0.0)
        rated = f"; at the base's upload rate {same['bytes'] * up['seconds'] / up['bytes']:.2f} s" if up else ""
        add("publish", same["seconds"],
            f"its {same.get('files')} files ({same['bytes'] / 1e6:.1f} MB) into the same store by plain boto3 in the "
            f"trainer's parts {parts:.2f} s; as one PUT per file {one_put:.2f} s "
            f"({phases['publish']['seconds'] / one_put if one_put else 0:.2f}x){rated}")
    return out


def _ran(results: dict):
    """(row name, its result, its CLI phases, its shape's quantize floor) for every row whose CLI ran."""
    for name, res in results["rows"].items():
        if "cli" in res:
            yield name, res, res["cli"]["phases"], results["floors"].get("quantize", {}).get(res["row"]["shape"], {})


def render(results: dict) -> tuple[str, bool]:
    ok = True
    lines = ["| row | CLI steady tok/s | benchmark fast path tok/s | CLI / fast path | target >= 95% |",
             "|---|---|---|---|---|"]
    for name, res in results["rows"].items():
        if "cli" not in res:
            lines.append(f"| {name} | - | - | - | {res.get('error', '-')[:80]} |")
            ok = False
            continue
        cli, fast = res["cli"].get("steady_tokens_per_s"), res["fast_path"].get("tokens_per_s")
        ratio = _ratio(cli, fast)
        met = ratio is not None and ratio >= TARGET_SPEED and res["cli"]["ok"]
        ok &= met
        lines.append(f"| {name} | {cli} | {_round(fast) if fast else res['fast_path'].get('error', '-')[-60:]} | "
                     f"{f'{ratio:.3f}' if ratio else '-'} | {'met' if met else 'MISSED'} |")
    lines += ["", "| row | phase | CLI s | floor s | CLI / floor | target <= 1.5x | floor |", "|---|---|---|---|---|---|---|"]
    for name, res, _, _ in _ran(results):
        for phase, seconds, floor_s, what in phase_rows(res, results["floors"]):
            ratio = _ratio(seconds, floor_s)
            met = ratio is not None and ratio <= TARGET_PHASE
            ok &= met
            lines.append(f"| {name} | {phase} | {seconds:.2f} | {floor_s:.2f} | {f'{ratio:.2f}x' if ratio else '-'} | "
                         f"{'met' if met else 'MISSED'} | {what} |")
    lines += ["", "| row | quantize s | start-up thread s (startup phase waited) | fromPretrained | prepareKbit | floor s | "
              "floor: read, place, quantize, cast | fromPretrained / floor |", "|---|---|---|---|---|---|---|---|"]
    for name, res, ph, quant in _ran(results):
        step = {k: ph.get(k, {}).get("seconds") for k in ("quantize", "startup", "fromPretrained", "prepareKbit")}
        parts = quant.get("parts", {})
        cells = [f"{v:.2f}" if v is not None else "-" for v in step.values()]
        warmed = (res["cli"].get("warmup_log") or "").split()
        if len(warmed) > 5:  # "start-up (imports, device warm-up) took 17.9 s on a thread, ..."
            cells[1] = f"{warmed[5]} ({cells[1]})"
        lines.append(f"| {name} | " + " | ".join(cells)
                     + f" | {_round(quant.get('seconds'), 2)} | "
                     + (", ".join(f"{parts[k]:.2f}" for k in ("read", "place", "quantize", "cast")) if parts else "-")
                     + f" | {f'{r:.2f}x' if (r := _ratio(step['fromPretrained'], quant.get('seconds'))) else '-'} |")
    lines += ["", "| row | floor s (pageable copy) | again | floor s (pinned staging, ring alloc s) | "
              "load_quantized_model in the floor's process (1st, 2nd) | CLI fromPretrained + prepareKbit |",
              "|---|---|---|---|---|---|"]
    for name, _, ph, quant in _ran(results):
        pinned, loads = quant.get("pinned") or {}, (quant.get("trainer_load") or {}).get("seconds") or []
        cli_s = sum(ph.get(k, {}).get("seconds", 0.0) for k in ("fromPretrained", "prepareKbit"))
        lines.append(f"| {name} | {_round(quant.get('seconds'), 2)} | {_round(quant.get('again'), 2)} | "
                     f"{_round(pinned.get('seconds'), 2)} ({pinned.get('pin_s', '-')}) | "
                     f"{', '.join(f'{v:.2f}' for v in loads) or quant.get('diagnostics_error', '-')[:60]} | {cli_s:.2f} |")
    downloaded = [(name, ph, res["quantize_download"]) for name, res, ph, _ in _ran(results) if res.get("quantize_download")]
    if downloaded:  # quantize_floor_downloaded: the floor on a downloaded copy beside the original
        lines += ["", "| row | CLI quantize s | floor on the original, fresh process | on a downloaded copy, fresh process "
                  "| after a download in the same process: on the copy, on the original |", "|---|---|---|---|---|"]
        for name, ph, d in downloaded:
            cells = ([d["error"][-80:], "-", "-"] if "error" in d else
                     [_round(d.get("on_original_fresh_process"), 2), _round(d.get("on_copy_fresh_process"), 2),
                      f"{_round(d.get('on_copy_after_download'), 2)}, {_round(d.get('on_original_after_download'), 2)}"])
            lines.append(f"| {name} | {_round(ph.get('quantize', {}).get('seconds'), 2)} | " + " | ".join(map(str, cells)) + " |")
    lines += ["", "| row | CLI wall s | train s | outside training s | eval before + after s (share of train) | "
              "every phase (s) |", "|---|---|---|---|---|---|"]
    for name, res, ph, _ in _ran(results):
        train = ph.get("train", {}).get("seconds", 0.0)
        evals = sum(ph.get(p, {}).get("seconds", 0.0) for p in ("evalBefore", "evalAfter"))
        every = ", ".join(f"{p} {v['seconds']:.1f}" for p, v in ph.items() if p not in QUANTIZE_STEPS)
        lines.append(f"| {name} | {res['cli']['wall_s']} | {train:.1f} | {res['cli']['wall_s'] - train:.1f} | "
                     f"{evals:.1f} ({100 * evals / train if train else 0:.1f}%) | {every} |")
    return "\n".join(lines), ok


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="a tiny shape on the CPU: every step, in seconds")
    ap.add_argument("--only", help=f"comma-separated rows (default all: {', '.join(ROWS)})")
    ap.add_argument("--steps", type=int, default=None, help="CLI optimizer steps per row (default 30; dry run 6)")
    ap.add_argument("--budget-s", type=float, default=570.0, help="start no row after this many seconds")
    ap.add_argument("--out", help="folder for table.md and results.json (default $OUT)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (CLI logs, configs)")
    ap.add_argument("--no-download", action="store_true",
                    help="every row reads its model from the local folder (pvc://): no download phase, and the "
                         "upload rate from a sample of the checkpoint (saves ~50 s of a call at the 1.5B row)")
    ap.add_argument("--no-diagnostics", action="store_true",
                    help="skip session 10's diagnostics beside the quantize floor (pinned floor, second pass, "
                         "the trainer's load in process: ~4 s per billion parameters)")
    ap.add_argument("--fresh-tokenize-floor", nargs="?", const="all", default=None, metavar="ROW",
                    help="also take the tokenize floor as a fresh process's first pass, for every row or only ROW "
                         "(a process start, ~20 s on the H200 machine); when taken, the phase is judged against it: "
                         "the CLI's pass is its process's first too, and a process's first large pass pays a fixed "
                         "cost (its heap growing) that the driver's warm process has already paid")
    from qlora_trainer.acceleration.planner import MEMORY_POLICIES

    ap.add_argument("--memory", choices=MEMORY_POLICIES, default=None,
                    help="the memory plan's policy for the CLI (spec.training.acceleration.memory) and the fast "
                         "path alike (default auto)")
    ap.add_argument("--task", help=argparse.SUPPRESS)
    ap.add_argument("task_args", nargs="*", help=argparse.SUPPRESS)
    opts = ap.parse_args()
    if opts.memory:
        os.environ["QLORA_BENCH_MEMORY"] = opts.memory  # the rows' own processes inherit it
    if opts.task == "checkpoints":
        for shape in opts.task_args[0].split(","):
            write_checkpoint(shape, ROOT / CLAIM / shape)
            print(f"[cli-bench] checkpoint {shape} written", flush=True)
        return 0
    if opts.task:
        task_main(opts.task, opts.task_args)
        return 0
    return drive(opts)


if __name__ == "__main__":
    sys.exit(main())
