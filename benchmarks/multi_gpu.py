"""Beyond one GPU: data parallel over two GPUs, and a Llama-3-70B-shaped model on one 48 GB card.

One script, one table, one device call on the `nvidia-h200-x2` kind (JSON and logs under $OUT):

    python benchmarks/multi_gpu.py                  # every row, table last
    python benchmarks/multi_gpu.py --only dp        # the data-parallel rows only
    python benchmarks/multi_gpu.py --dry-run        # the same code on this CPU: tiny shapes, gloo, fp32

Rows (random weights of real shapes, NF4 + double quantization, bf16, LoRA r16 on all projections;
median tokens/s of the timed steps after warm-up; peak = max_memory_allocated per GPU):
- dp-7b-1gpu:      Qwen2.5-7B, 1024 x 4, the trainer's plan and fast path on one GPU (its default,
                   CUDA graphs on) -- the baseline.
- dp-7b-1gpu-nograph: the same with CUDA graphs off (what each rank runs under DDP).
- dp-7b-2gpu:      two ranks through torchrun + DDP (NCCL), each with the same per-GPU plan and its
                   own micro-batches; target >= 1.85x dp-7b-1gpu.
- dp-7b-2gpu-sockets: the same with NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1 (NCCL over TCP sockets,
                   standing in for two nodes); target >= 1.7x.
- 70b-1gpu-lean:   a Llama-3-70B shape built on the meta device and quantized layer by layer straight
                   onto the GPU (no 140 GB of bf16 ever exists), on one GPU capped at 48 GB with
                   set_per_process_memory_fraction, the planner's lean plan; step-0 loss against
- 70b-1gpu-plain:  the plain recipe on the same batches and the same cap (it may not fit: then the row
                   says OOM, which is the point of the lean plan).
- 70b-2gpu-sharded: the same 70B shape sharded across two GPUs, each capped at 48 GB: the trainer's
                   sharded path (qlora_trainer.sharding: NF4 stored as bf16 bytes, FSDP2 over every
                   decoder layer, the embeddings and the head; the plain recipe with every layer
                   recomputed), each rank its own micro-batch; step-0 loss of rank 0 (the same batch as
                   the one-GPU rows' step 0) against the plain row.
- 70b8l-1gpu-plain / 70b8l-2gpu-sharded: a Llama-3-70B layer shape with 8 layers, uncapped, where the
                   plain recipe surely fits: the sharded path's step-0 loss against plain's on the same
                   batch, whatever the 80-layer plain row does.

The data-parallel ranks run the same loop as torch's DDP users do: no_sync() on every micro-batch
but the last of a step, so each optimizer step all-reduces the LoRA gradients once.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import speed_vs_unsloth as base  # noqa: E402  (the shapes, model files, plans and loop of the speed table)

LLAMA3_70B = dict(model_type="llama", architectures=["LlamaForCausalLM"], num_hidden_layers=80, hidden_size=8192,
                  intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8, vocab_size=128256,
                  tie_word_embeddings=False, max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
                  hidden_act="silu")
TINY = dict(model_type="llama", architectures=["LlamaForCausalLM"], num_hidden_layers=2, hidden_size=64,
            intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
            tie_word_embeddings=False, max_position_embeddings=512, rope_theta=10000.0, rms_norm_eps=1e-5,
            hidden_act="silu")
CAP_GB = 48
WARMUP, TIMED = 3, 10


def rows(dry: bool) -> list[dict]:
    shape = "tiny" if dry else "qwen2.5-7b"
    seq, micro = (64, 2) if dry else (1024, 4)
    # NCCL over TCP sockets only (no NVLink peer-to-peer, no shared memory, no InfiniBand): two nodes' path
    sockets = {"NCCL_P2P_DISABLE": "1", "NCCL_SHM_DISABLE": "1", "NCCL_NET": "Socket", "NCCL_IB_DISABLE": "1"}
    big = "tiny" if dry else "llama-3-70b"
    small70 = "tiny" if dry else "llama-3-70b-8l"
    big_seq = 64 if dry else 1024
    return [
        dict(name="dp-7b-1gpu", shape=shape, seq=seq, micro=micro, nproc=1, engine="ours", timeout=900),
        dict(name="dp-7b-1gpu-nograph", shape=shape, seq=seq, micro=micro, nproc=1, engine="ours",
             env={"QLORA_CUDA_GRAPHS": "0"}, timeout=900),
        dict(name="dp-7b-2gpu", shape=shape, seq=seq, micro=micro, nproc=2, engine="ours", timeout=900),
        dict(name="dp-7b-2gpu-sockets", shape=shape, seq=seq, micro=micro, nproc=2, engine="ours", env=sockets,
             timeout=900),
        dict(name="70b-1gpu-lean", shape=big, seq=big_seq, micro=1, nproc=1, engine="ours", cap_gb=CAP_GB,
             build="meta", timeout=1500),
        dict(name="70b-1gpu-plain", shape=big, seq=big_seq, micro=1, nproc=1, engine="plain", cap_gb=CAP_GB,
             build="meta", timeout=1500),
        dict(name="70b-2gpu-sharded", shape=big, seq=big_seq, micro=1, nproc=2, engine="sharded", cap_gb=CAP_GB,
             build="meta", timeout=1500),
        dict(name="70b8l-1gpu-plain", shape=small70, seq=big_seq, micro=1, nproc=1, engine="plain", build="meta",
             timeout=600),
        dict(name="70b8l-2gpu-sharded", shape=small70, seq=big_seq, micro=1, nproc=2, engine="sharded", build="meta",
             timeout=600),
    ]


# --- one rank --------------------------------------------------------------------------------------

def build_on_meta(shape: dict, device: str, dtype, seed: int = 0, quant_storage=None):
    """A model of `shape` with random weights, never materialised in bf16: built on the meta device,
    then every decoder Linear is replaced by an NF4 Linear4bit quantized from a random bf16 matrix
    made on `device` one at a time (at most one layer's largest matrix exists at once); embeddings,
    norms and the head are made directly on `device`. `quant_storage`: the dtype the packed 4-bit
    bytes are stored as (a float dtype for FSDP2, as the trainer's sharded path loads them). The
    module keeps the quantization state too (module=q): FSDP2's all-gathered weight is a plain tensor,
    and bitsandbytes restores the state from the module."""
    import bitsandbytes as bnb
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**{**shape, "dtype": str(dtype).removeprefix("torch.")})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    g = torch.Generator(device=device).manual_seed(seed)
    layers = model.model.layers
    for layer in layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if not isinstance(child, torch.nn.Linear):
                    continue
                storage = quant_storage or torch.uint8
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=False, compute_dtype=dtype,
                                      compress_statistics=True, quant_type="nf4", quant_storage=storage,
                                      device="meta")
                w = torch.randn(child.out_features, child.in_features, device=device, generator=g, dtype=dtype)
                q.weight = bnb.nn.Params4bit(w.mul_(0.02), requires_grad=False, compress_statistics=True,
                                             quant_type="nf4", quant_storage=storage, module=q).to(device)
                del w
                if device == "cpu":  # see qlora_trainer.model_loading._keep_cpu_4bit_differentiable
                    q.support_avx512bf16_for_cpu = False
                setattr(parent, name, q)
    with torch.no_grad():
        for module in model.modules():
            for name, p in list(module.named_parameters(recurse=False)):
                if p.is_meta:
                    fresh = torch.ones(p.shape, dtype=dtype, device=device) if p.dim() == 1 else \
                        torch.randn(p.shape, device=device, generator=g, dtype=dtype).mul_(0.02)
                    setattr(module, name, torch.nn.Parameter(fresh, requires_grad=False))
    rotary = model.model.rotary_emb
    model.model.rotary_emb = type(rotary)(config=config).to(device)  # its tables were made on meta
    model.config.use_cache = False
    return model


def add_lora(model, dropout: float, checkpointing: bool):
    """peft's LoRA on the 4-bit base, as the trainer does, without upcasting the bf16 embeddings and
    head to fp32 (frozen: fp32 copies would cost 8 GB at 70B for nothing)."""
    from peft import LoraConfig, get_peft_model

    model.enable_input_require_grads()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=dropout, target_modules=base.TARGETS,
                                            bias="none", task_type="CAUSAL_LM"))


def plan_for(cfg, shape: dict, seq: int, micro: int, dropout: float, fraction: float | None, dry: bool):
    from qlora_trainer.acceleration import GIB, GpuSpec, JobShape, ModelShape, plan_for_gpu, plan_memory
    from transformers import AutoConfig

    job = JobShape(seq_len=seq, micro_batch=micro, grad_accum=1, lora_rank=16, lora_dropout=dropout)
    config = AutoConfig.for_model(**shape)
    if dry:
        return plan_memory(ModelShape.from_hf_config(config), job, GpuSpec(memory_bytes=64 * GIB, name="cpu"),
                           packing=False)
    return plan_for_gpu(config, job, memory_fraction=fraction, packing=False)


def run_rank(cfg: dict) -> dict:
    dry = cfg.get("dry_run", False)
    world, rank, local = (int(os.environ.get(k, d)) for k, d in (("WORLD_SIZE", 1), ("RANK", 0), ("LOCAL_RANK", 0)))
    if world > 1 and not dry:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(local)  # each rank sees its own GPU as cuda:0
    os.environ.update(cfg.get("env", {}))
    if world > 1:
        os.environ["QLORA_CUDA_GRAPHS"] = "0"  # as the trainer does under DDP (trainer_hooks.accelerate)
    import torch
    import torch.distributed as dist

    device = "cpu" if dry else "cuda"
    dtype = torch.float32 if dry else torch.bfloat16
    if world > 1:
        dist.init_process_group("gloo" if dry else "nccl")
    fraction = None
    if cfg.get("cap_gb") and not dry:
        fraction = cfg["cap_gb"] * 1e9 / torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(fraction)
    shape = {"tiny": TINY, "llama-3-70b": LLAMA3_70B, "llama-3-70b-8l": {**LLAMA3_70B, "num_hidden_layers": 8}
             }.get(cfg["shape"]) or base.SHAPES[cfg["shape"]]
    seq, micro, engine = cfg["seq"], cfg["micro"], cfg["engine"]
    dropout = 0.05
    result = {"name": cfg["name"], "world_size": world}
    plan = plan_for(cfg, shape, seq, micro, dropout, fraction, dry) if engine == "ours" else None
    accum = 1
    if plan is not None and os.environ.get("QLORA_CUDA_GRAPHS") == "0":
        from dataclasses import replace

        plan = replace(plan, cuda_graphs=False)  # as trainer_hooks.accelerate does under DDP
    if plan is not None:
        micro, accum = plan.micro_batch, plan.grad_accum
        result["plan"] = plan.describe()
    t = time.perf_counter()
    sharded = engine == "sharded"
    if cfg.get("build") == "meta" or dry:
        model = add_lora(build_on_meta(shape, device, dtype, quant_storage=dtype if sharded else None), dropout,
                         checkpointing=plan is None)
    else:
        model = base.load_model(engine, base.SHM / cfg["shape"], seq, dropout)
    if plan is not None:
        from qlora_trainer.acceleration import apply_acceleration

        result["acceleration"] = apply_acceleration(model, plan).describe()
    if sharded:  # the trainer's sharded path: FSDP2 units, torch's fused AdamW on the sharded LoRA
        from qlora_trainer.distributed import World
        from qlora_trainer.sharding import shard

        shard(model, World(rank, local if dry else 0, world))
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0, fused=True)
    else:
        params, opt = base.make_optimizer(model, device=device, plan=plan)
    result["load_s"] = round(time.perf_counter() - t, 1)
    trained = model
    if world > 1 and not sharded:
        trained = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=None if dry else [0], find_unused_parameters=False, broadcast_buffers=False)
    if not dry:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    # Every rank its own micro-batches: rank r takes every world-th one of a global pool, so the
    # group trains world x the one-GPU batch per step with the same per-GPU plan.
    pool = base._fixed_batches(shape["vocab_size"], micro, seq, accum * world)
    times, losses = [], []
    for step in range(WARMUP + TIMED):
        batches = pool(step)[rank::world]
        items = sum(int((b["labels"][..., 1:] != -100).sum()) for b, _ in batches)
        if not dry:
            torch.cuda.synchronize()
        start = time.perf_counter()
        total = 0.0
        for i, (kwargs, _) in enumerate(batches):
            kwargs = {k: v.to(device) for k, v in kwargs.items()}
            last = i == len(batches) - 1
            sync = trained.no_sync() if world > 1 and not last and not sharded else _nothing()
            with sync, torch.autocast(device, dtype=dtype, enabled=not dry):
                loss = trained(**kwargs, num_items_in_batch=items).loss
                loss.backward()
            total += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(params, 0.3)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if not dry:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        losses.append(total)
    step_s = statistics.median(times[WARMUP:])
    tokens = world * micro * accum * seq
    result.update(tokens_per_s=round(tokens / step_s, 1), tokens_per_s_per_gpu=round(tokens / step_s / world, 1),
                  step_s=round(step_s, 4), micro_batch=micro, grad_accum=accum, losses=[round(x, 4) for x in losses],
                  peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if not dry else None)
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, {"peak_gib": result["peak_gib"], "loss0": result["losses"][0]})
        result["per_rank"] = gathered
        dist.destroy_process_group()
    return result


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# --- the driver --------------------------------------------------------------------------------------

def launch(cfg: dict, log_dir: Path, env: dict) -> dict:
    """One row in fresh processes: python for one rank, torchrun (standalone) for several."""
    if cfg.get("skip"):
        return {"name": cfg["name"], "error": cfg["skip"]}
    worker = [str(Path(__file__)), "--rank-worker", json.dumps(cfg)]
    argv = [sys.executable, *worker] if cfg["nproc"] == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={cfg['nproc']}", *worker]
    log = log_dir / f"{cfg['name']}.log"
    start = time.monotonic()
    try:
        with open(log, "w") as err:
            out = subprocess.run(argv, stdout=subprocess.PIPE, stderr=err, text=True, env={**env, **cfg.get("env", {})},
                                 timeout=cfg["timeout"]).stdout
    except subprocess.TimeoutExpired:
        return {"name": cfg["name"], "error": f"timed out after {cfg['timeout']} s"}
    first = next((json.loads(x[7:]) for x in out.splitlines() if x.startswith("RESULT ")), None)
    if first is None:
        tail = log.read_text()[-800:]
        oom = "OutOfMemoryError" in tail or "out of memory" in tail
        return {"name": cfg["name"], "error": ("OOM: " if oom else "") + tail[-400:].replace("\n", " | ")}
    first["wall_s"] = round(time.monotonic() - start, 1)
    return first


def render(results: dict[str, dict], dry: bool) -> str:
    one = results.get("dp-7b-1gpu", {}).get("tokens_per_s")
    lines = ["| row | tokens/s (total) | per GPU | vs 1 GPU | peak GiB per GPU | step-0 loss | note |",
             "|---|---|---|---|---|---|---|"]
    targets = {"dp-7b-2gpu": 1.85, "dp-7b-2gpu-sockets": 1.7}
    # step-0 loss: each 70B-shaped row against the plain recipe's on the same batch (rank 0's micro-batch
    # for the sharded rows is the one-GPU rows' step-0 batch)
    plain_of = {"70b-1gpu-lean": "70b-1gpu-plain", "70b-2gpu-sharded": "70b-1gpu-plain",
                "70b8l-2gpu-sharded": "70b8l-1gpu-plain"}
    for name, r in results.items():
        if "error" in r:
            lines.append(f"| {name} | - | - | - | - | - | {r['error'][:200]} |")
            continue
        ratio = r["tokens_per_s"] / one if one else None
        note = ""
        same = results.get("dp-7b-1gpu-nograph", {}).get("tokens_per_s")
        if name in targets and same:
            # the target compares with one GPU running the same per-GPU plan: under DDP that plan has
            # no CUDA graphs (trainer_hooks.for_data_parallel), as the -nograph row
            same_ratio = r["tokens_per_s"] / same
            note = (f"{same_ratio:.2f}x one GPU on the same plan (no graphs): target >= {targets[name]}x "
                    f"{'MET' if same_ratio >= targets[name] else 'NOT MET'}")
        plain0 = (results.get(plain_of.get(name), {}).get("losses") or [None])[0]
        if plain0 is not None:
            note = f"plain step-0 loss {plain0:.4f} (diff {abs(r['losses'][0] - plain0):.4f})"
        elif name in plain_of:
            note = f"no plain step-0 loss: {plain_of[name]} did not run to a loss"
        peaks = [p["peak_gib"] for p in r.get("per_rank", [])] or [r.get("peak_gib")]
        lines.append(f"| {name} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s_per_gpu']:,.0f} | "
                     f"{'' if ratio is None else f'{ratio:.2f}x'} | {', '.join(str(p) for p in peaks)} | "
                     f"{r['losses'][0]:.4f} | {note} |")
    header = "CPU dry run (tiny shapes, gloo, fp32): wiring only, the numbers mean nothing\n\n" if dry else ""
    return header + "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="comma-separated prefixes of row names (dp, 70b)")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on this CPU with gloo")
    ap.add_argument("--out", help="folder for results.json, table.md and logs (default $OUT)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="stop starting rows after this many seconds (a row's timeout is cut to what is left)")
    ap.add_argument("--rank-worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rank_worker:
        result = run_rank(json.loads(args.rank_worker))
        if int(os.environ.get("RANK", 0)) == 0:  # rank 0's result holds every rank's peak and loss
            print("RESULT " + json.dumps(result), flush=True)
        return
    began = time.monotonic()  # the budget counts from here: the 7B checkpoint is made inside it
    out = Path(args.out or os.environ.get("OUT") or HERE.parent / "out")
    (out / "logs").mkdir(parents=True, exist_ok=True)
    todo = [r for r in rows(args.dry_run) if not args.only or any(r["name"].startswith(p) for p in args.only.split(","))]
    env = base.worker_env("" if args.dry_run else base.prepare_site())
    if args.dry_run:
        env.update(OMP_NUM_THREADS="1", QLORA_ACCELERATION="cpu")
    elif any(r.get("shape") == "qwen2.5-7b" for r in todo):
        base.make_models(["qwen2.5-7b"]) if not (base.SHM / "qwen2.5-7b" / ".done").exists() else None
    env.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast stays off on shared hosts
    results = {}
    for cfg in todo:
        cfg["dry_run"] = args.dry_run
        left = None if args.budget_s is None else args.budget_s - (time.monotonic() - began)
        if left is not None and left < 30:
            results[cfg["name"]] = {"name": cfg["name"], "error": f"not run: the call's {args.budget_s:.0f} s budget was spent"}
            continue
        if left is not None and not cfg.get("skip"):
            cfg["timeout"] = min(cfg["timeout"], int(left))
        results[cfg["name"]] = launch(cfg, out / "logs", env)
        print(f"[multi-gpu] {cfg['name']}: {json.dumps(results[cfg['name']])[:400]}", flush=True)
        (out / "results.json").write_text(json.dumps(results, indent=1))
    table = render(results, args.dry_run)
    (out / "table.md").write_text(table)
    print(table, flush=True)


if __name__ == "__main__":
    main()
