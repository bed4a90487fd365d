"""Beyond one GPU: data parallel over two GPUs, and a Llama-3-70B-shaped model on one 48 GB card.

One script, one table, in as few device calls on the `nvidia-h200-x2` kind as the time allows
(JSON, logs and profiles under $OUT; --only picks rows by name prefix, --budget-s stops starting rows):

    python benchmarks/multi_gpu.py                  # every row, table last
    python benchmarks/multi_gpu.py --only dp        # the data-parallel rows only
    python benchmarks/multi_gpu.py --dry-run        # the same code on this CPU: tiny shapes, gloo, fp32

Rows (random weights of real shapes built on the meta device and quantized matrix by matrix on the
GPU, NF4 + double quantization, bf16, LoRA r16 on all projections trained in bf16 as the trainer
does; median step time of 30 timed steps after 3 warm-ups, with its spread; peak =
max_memory_allocated per GPU):
- dp-7b-1gpu:      Qwen2.5-7B, 1024 x 4, the trainer's plan and fast path on one GPU (CUDA graphs on).
- dp-7b-2gpu:      two ranks through torchrun, each with the same per-GPU plan and its own micro-batches,
                   as the trainer runs data parallel: no DDP, CUDA graphs on, the accumulated LoRA
                   gradients averaged once per step (qlora_trainer.gradient_sync, NCCL over NVLink);
                   target >= 1.85x dp-7b-1gpu. One extra step is profiled (torch.profiler).
- dp-7b-2gpu-sockets: the same with NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1 (NCCL over TCP sockets,
                   standing in for two nodes); target >= 1.7x.
- 70b-1gpu-lean / 70b-1gpu-plain: a Llama-3-70B shape (no 140 GB of bf16 ever exists) on one GPU
                   capped at 48 GB with set_per_process_memory_fraction: the planner's lean plan on
                   GPU 0 and the plain recipe on GPU 1, at the same time; step-0 loss of both on the
                   same batch.
- dp-7b-1gpu-nograph / dp-7b-2gpu-ddp: the last session's data parallel (DDP's hooks, no_sync on all
                   but the last micro-step, so CUDA graphs off) against one GPU without graphs.
- 70b-2gpu-sharded, 70b8l-1gpu-plain / 70b8l-2gpu-sharded: the sharded path (qlora_trainer.sharding,
                   FSDP2 over NF4 stored as bf16) on two GPUs capped at 48 GB, and an 8-layer 70B shape
                   uncapped against plain (step-0 loss on the same batch).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
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
WARMUP, TIMED = 3, 30


def rows(dry: bool) -> list[dict]:
    shape = "tiny" if dry else "qwen2.5-7b"
    seq, micro = (64, 2) if dry else (1024, 4)
    # NCCL over TCP sockets only (no NVLink peer-to-peer, no shared memory, no InfiniBand): two nodes' path
    sockets = {"NCCL_P2P_DISABLE": "1", "NCCL_SHM_DISABLE": "1", "NCCL_NET": "Socket", "NCCL_IB_DISABLE": "1"}
    big = "tiny" if dry else "llama-3-70b"
    small70 = "tiny" if dry else "llama-3-70b-8l"
    big_seq = 64 if dry else 1024
    # needs_s: a row is not started with less of the call's budget left (it would be cut off)
    dp = dict(shape=shape, seq=seq, micro=micro, engine="ours", build="meta", timeout=420, needs_s=60)
    big70 = dict(shape=big, seq=big_seq, micro=1, nproc=1, cap_gb=CAP_GB, build="meta", timeout=420, needs_s=90,
                 warmup=2, timed=4, group="70b-1gpu")
    return [
        # the trainer's data parallel: CUDA graphs on, the step's own all-reduce (gradient_sync.py)
        dict(name="dp-7b-1gpu", nproc=1, profile=True, **dp),
        dict(name="dp-7b-2gpu", nproc=2, profile=True, **dp),
        dict(name="dp-7b-2gpu-sockets", nproc=2, env=sockets, **dp),
        # the 70B on one GPU capped at 48 GB: the lean plan on GPU 0 and the plain recipe on GPU 1, at once
        dict(name="70b-1gpu-lean", engine="ours", gpu=0, **big70),
        dict(name="70b-1gpu-plain", engine="plain", gpu=1, **big70),
        # the last session's way, for the record: DDP's hooks, so no CUDA graphs
        dict(name="dp-7b-1gpu-nograph", nproc=1, env={"QLORA_CUDA_GRAPHS": "0"}, **{**dp, "timed": 20}),
        dict(name="dp-7b-2gpu-ddp", nproc=2, sync="ddp", profile=True, **{**dp, "timed": 20}),
        # (needs_s: in session 1 these three rows took 186 s together)
        dict(name="70b-2gpu-sharded", shape=big, seq=big_seq, micro=1, nproc=2, engine="sharded", cap_gb=CAP_GB,
             build="meta", timeout=600, needs_s=150),
        dict(name="70b8l-1gpu-plain", shape=small70, seq=big_seq, micro=1, nproc=1, engine="plain", build="meta",
             timeout=600, needs_s=60),
        dict(name="70b8l-2gpu-sharded", shape=small70, seq=big_seq, micro=1, nproc=2, engine="sharded", build="meta",
             timeout=600, needs_s=60),
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
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=dtype,
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
                    fresh = (torch.zeros if name == "bias" else torch.ones)(p.shape, dtype=dtype, device=device) \
                        if p.dim() == 1 else \
                        torch.randn(p.shape, device=device, generator=g, dtype=dtype).mul_(0.02)
                    setattr(module, name, torch.nn.Parameter(fresh, requires_grad=False))
    rotary = model.model.rotary_emb
    model.model.rotary_emb = type(rotary)(config=config).to(device)  # its tables were made on meta
    model.config.use_cache = False
    return model


def add_lora(model, dropout: float, checkpointing: bool, dtype):
    """peft's LoRA on the 4-bit base, as the trainer does, without upcasting the bf16 embeddings and
    head to fp32 (frozen: fp32 copies would cost 8 GB at 70B for nothing). The adapter then trains in
    the compute dtype, as the trainer's does (trl's SFTTrainer casts a quantized model's LoRA weights
    to bf16; the planner counts it so: JobShape.adapter_bytes)."""
    from peft import LoraConfig, get_peft_model

    model.enable_input_require_grads()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=dropout, target_modules=base.TARGETS,
                                             bias="none", task_type="CAUSAL_LM"))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.to(dtype)
    return model


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
    ddp = world > 1 and cfg.get("sync") == "ddp"
    if ddp:
        os.environ["QLORA_CUDA_GRAPHS"] = "0"  # as the trainer does under DDP (trainer_hooks.for_data_parallel)
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
    result = {"name": cfg["name"], "world_size": world, "sync": None}
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
                         checkpointing=plan is None, dtype=dtype)
    else:
        model = base.load_model(engine, base.SHM / cfg["shape"], seq, dropout)
    if plan is not None:
        from qlora_trainer.acceleration import apply_acceleration, labels_checked_on_host

        result["acceleration"] = apply_acceleration(model, plan).describe()
        labels_checked_on_host(model)  # batches_of checks every batch on the host before it goes to the GPU
    if sharded:  # the trainer's sharded path: FSDP2 units, torch's fused AdamW on the sharded LoRA
        from qlora_trainer.distributed import World
        from qlora_trainer.sharding import shard

        shard(model, World(rank, local if dry else 0, world))
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0, fused=True)
    else:
        params, opt = base.make_optimizer(model, device=device, plan=plan)
    result["load_s"] = round(time.perf_counter() - t, 1)
    trained, sync = model, None
    if world > 1 and not sharded:
        if ddp:  # the last session's way: DDP's hooks all-reduce in buckets during the last backward
            trained = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=None if dry else [0], find_unused_parameters=False, broadcast_buffers=False)
            result["sync"] = "DDP (no_sync on all but the last micro-step)"
        else:  # the trainer's way (training_loop._all_reduce_after_step): one averaging per step
            from qlora_trainer.gradient_sync import GradientSync

            sync = GradientSync(model)
            sync.broadcast_parameters()
            result["sync"] = sync.describe()
    if not dry:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    # Every rank its own micro-batches: rank r takes every world-th one of a global pool, so the
    # group trains world x the one-GPU batch per step with the same per-GPU plan. The batches are on
    # the device before the clock starts (the trainer copies pinned batches without waiting), each
    # checked against the vocabulary on the host first, as the trainer's collator does: the fast
    # path's loss, told so (labels_checked_on_host), then skips its own check, a host read of the
    # GPU at every micro-step.
    from qlora_trainer.data import check_token_ids

    pool = base._fixed_batches(shape["vocab_size"], micro, seq, accum * world)
    on_device = {}

    def batches_of(step):
        key = step % 4  # _fixed_batches cycles a pool of 4 steps
        if key not in on_device:
            mine = pool(step)[rank::world]
            for kw, _ in mine:
                check_token_ids(kw["input_ids"].numpy(), kw["labels"].numpy(), shape["vocab_size"])
            on_device[key] = [({k: v.to(device) for k, v in kw.items()}, u) for kw, u in mine]
        return on_device[key]

    def one_step(step) -> torch.Tensor:
        batches = batches_of(step)
        items = sum(int((b["labels"][..., 1:] != -100).sum()) for b, _ in batches)
        total = torch.zeros((), device=device)
        for i, (kwargs, _) in enumerate(batches):
            last = i == len(batches) - 1
            context = trained.no_sync() if ddp and not last else _nothing()
            with context, torch.autocast(device, dtype=dtype, enabled=not dry):
                loss = trained(**kwargs, num_items_in_batch=items).loss
                loss.backward()
            total += loss.detach().float()  # summed on the device: no host read per micro-step
        if sync is not None:
            sync.all_reduce()
        torch.nn.utils.clip_grad_norm_(params, 0.3)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return total

    for step in range(4):
        batches_of(step)
    times, losses = [], []
    warmup, timed_steps = cfg.get("warmup", WARMUP), cfg.get("timed", TIMED)
    for step in range(warmup + timed_steps):
        if not dry:
            torch.cuda.synchronize()
        start = time.perf_counter()
        total = one_step(step)
        if not dry:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        losses.append(float(total))
    timed = sorted(times[warmup:])
    step_s = statistics.median(timed)
    tokens = world * micro * accum * seq
    result.update(tokens_per_s=round(tokens / step_s, 1), tokens_per_s_per_gpu=round(tokens / step_s / world, 1),
                  step_s=round(step_s, 4), step_s_min=round(timed[0], 4), step_s_max=round(timed[-1], 4),
                  step_s_p10=round(timed[len(timed) // 10], 4), step_s_p90=round(timed[(9 * len(timed)) // 10], 4),
                  timed_steps=len(timed), micro_batch=micro, grad_accum=accum, losses=[round(x, 4) for x in losses],
                  peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if not dry else None)
    if cfg.get("profile"):
        result["profile"] = profile_step(one_step, warmup + timed_steps, dry, cfg, rank)
    if world > 1:
        # the ranks must hold the same adapter after training (their gradients were averaged)
        checksum = float(sum(p.detach().double().sum() for p in params)) if not sharded else None
        gathered = [None] * world
        dist.all_gather_object(gathered, {"peak_gib": result["peak_gib"], "loss0": result["losses"][0],
                                          "adapter_sum": checksum, "step_s": result["step_s"]})
        result["per_rank"] = gathered
        if not sharded:
            result["ranks_in_sync"] = len({r["adapter_sum"] for r in gathered}) == 1
        dist.destroy_process_group()
    return result


def profile_step(one_step, step: int, dry: bool, cfg: dict, rank: int) -> dict:
    """One more step under torch.profiler: wall time, the GPU's kernel time (all-reduce apart) and the
    top operators, written to $OUT/profile-<row>-rank<r>.txt; a summary goes into the result."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([] if dry else [ProfilerActivity.CUDA])
    if not dry:
        torch.cuda.synchronize()
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        one_step(step)
        if not dry:
            torch.cuda.synchronize()
        wall = time.perf_counter() - start
    summary = {"wall_ms": round(wall * 1e3, 1)}
    try:
        kernels = [e for e in prof.events() if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
        duration = lambda e: getattr(e, "device_time", None) or getattr(e, "cuda_time", 0) or 0  # noqa: E731
        # the NCCL kernels themselves (the profiler also puts an "nccl:all_reduce" annotation of the
        # same length on the device timeline: counting both doubled the time in the first call)
        comm = [e for e in kernels if e.name.startswith("ncclDevKernel") or e.name.startswith("ncclKernel")]
        kernels = [e for e in kernels if not e.name.startswith("nccl:")]
        summary.update(kernels=len(kernels), gpu_ms=round(sum(duration(e) for e in kernels if e not in comm) / 1e3, 1),
                       allreduce_ms=round(sum(duration(e) for e in comm) / 1e3, 2), allreduce_kernels=len(comm))
        sort = "self_cpu_time_total" if dry else "self_device_time_total"
        try:
            table = prof.key_averages().table(sort_by=sort, row_limit=15)
        except (AttributeError, KeyError, ValueError):
            table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=15)
        if rank == 0:  # a device call brings back at most 8 files
            out = Path(cfg.get("out") or ".")
            (out / f"profile-{cfg['name']}-rank{rank}.txt").write_text(json.dumps(summary) + "\n" + table)
    except Exception as exc:  # the summary is a bonus: never lose the row's numbers to it
        summary["error"] = f"{type(exc).__name__}: {exc}"[:200]
    return summary


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# --- the driver --------------------------------------------------------------------------------------

def start(cfg: dict, log_dir: Path, env: dict):
    """One row in fresh processes: python for one rank, torchrun (standalone) for several. A row with a
    `gpu` runs on that GPU alone (CUDA_VISIBLE_DEVICES), so two one-GPU rows can run at once."""
    worker = [str(Path(__file__)), "--rank-worker", json.dumps(cfg)]
    argv = [sys.executable, *worker] if cfg["nproc"] == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={cfg['nproc']}", *worker]
    env = {**env, **cfg.get("env", {})}
    if cfg.get("gpu") is not None and not cfg.get("dry_run"):
        env["CUDA_VISIBLE_DEVICES"] = str(cfg["gpu"])
    log = log_dir / f"{cfg['name']}.log"
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=open(log, "w"), text=True, env=env)
    return proc, log, time.monotonic()


def finish(cfg: dict, running) -> dict:
    proc, log, began = running
    try:
        out, _ = proc.communicate(timeout=max(1.0, cfg["timeout"] - (time.monotonic() - began)))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return {"name": cfg["name"], "error": f"timed out after {cfg['timeout']} s"}
    first = next((json.loads(x[7:]) for x in out.splitlines() if x.startswith("RESULT ")), None)
    if first is None:
        tail = log.read_text()[-800:]
        oom = "OutOfMemoryError" in tail or "out of memory" in tail
        return {"name": cfg["name"], "error": ("OOM: " if oom else "") + tail[-400:].replace("\n", " | ")}
    first["wall_s"] = round(time.monotonic() - began, 1)
    return first


def render(results: dict[str, dict], dry: bool) -> str:
    lines = ["| row | tokens/s (total) | per GPU | vs 1 GPU, same plan | step s: median (p10-p90, min-max) of N | "
             "peak GiB per GPU | step-0 loss | note |", "|---|---|---|---|---|---|---|---|"]
    # the 2-GPU rows against one GPU running the same per-GPU plan: graphs on for the trainer's way,
    # off for DDP's (as the trainer ran under DDP)
    same_plan = {"dp-7b-2gpu": "dp-7b-1gpu", "dp-7b-2gpu-sockets": "dp-7b-1gpu", "dp-7b-2gpu-ddp": "dp-7b-1gpu-nograph"}
    targets = {"dp-7b-2gpu": 1.85, "dp-7b-2gpu-sockets": 1.7, "dp-7b-2gpu-ddp": 1.85}
    # step-0 loss: each 70B-shaped row against the plain recipe's on the same batch (rank 0's micro-batch
    # for the sharded rows is the one-GPU rows' step-0 batch)
    plain_of = {"70b-1gpu-lean": "70b-1gpu-plain", "70b-2gpu-sharded": "70b-1gpu-plain",
                "70b8l-2gpu-sharded": "70b8l-1gpu-plain"}
    for name, r in results.items():
        if "error" in r:
            lines.append(f"| {name} | - | - | - | - | - | - | {r['error'][:200]} |")
            continue
        notes = []
        one = results.get(same_plan.get(name), {}).get("tokens_per_s")
        ratio = r["tokens_per_s"] / one if one else None
        if ratio is not None and name in targets:
            notes.append(f"target >= {targets[name]}x {'MET' if ratio >= targets[name] else 'NOT MET'}")
        if "ranks_in_sync" in r:
            notes.append("ranks hold the same adapter" if r["ranks_in_sync"] else "RANKS TRAINED APART")
        plain0 = (results.get(plain_of.get(name), {}).get("losses") or [None])[0]
        if plain0 is not None:
            notes.append(f"plain step-0 loss {plain0:.4f} (diff {abs(r['losses'][0] - plain0):.4f})")
        elif name in plain_of:
            notes.append(f"no plain step-0 loss: {plain_of[name]} did not run to a loss")
        if r.get("profile"):
            notes.append("profiled step: " + ", ".join(f"{k} {v}" for k, v in r["profile"].items()))
        peaks = [p["peak_gib"] for p in r.get("per_rank", [])] or [r.get("peak_gib")]
        spread = (f"{r['step_s']:.3f} ({r['step_s_p10']:.3f}-{r['step_s_p90']:.3f}, "
                  f"{r['step_s_min']:.3f}-{r['step_s_max']:.3f}) of {r['timed_steps']}")
        lines.append(f"| {name} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s_per_gpu']:,.0f} | "
                     f"{'' if ratio is None else f'{ratio:.2f}x'} | {spread} | {', '.join(str(p) for p in peaks)} | "
                     f"{r['losses'][0]:.4f} | {'; '.join(notes)} |")
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
    out.mkdir(parents=True, exist_ok=True)
    logs = Path(tempfile.mkdtemp(prefix="multi-gpu-logs-"))  # packed into out/logs.tar.gz (few files come back)
    todo = [r for r in rows(args.dry_run) if not args.only or any(r["name"].startswith(p) for p in args.only.split(","))]
    env = base.worker_env("" if args.dry_run else base.prepare_site())
    if args.dry_run:
        # the graph programs run eagerly on the CPU (cuda_graphs.py): the static .grad buffers the
        # step's all-reduce must reach are the same as on GPUs
        env.update(OMP_NUM_THREADS="1", QLORA_ACCELERATION="cpu", QLORA_CUDA_GRAPHS="emulate")
    env.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast stays off on shared hosts
    results = {}
    groups: list[list[dict]] = []  # rows of one `group` run at once (each on its own GPU)
    for cfg in todo:
        cfg.update(dry_run=args.dry_run, out=str(out))
        same = [g for g in groups if cfg.get("group") and g[0].get("group") == cfg["group"]]
        (same[0].append(cfg) if same else groups.append([cfg]))
    for group in groups:
        left = None if args.budget_s is None else args.budget_s - (time.monotonic() - began)
        if left is not None and left < max(cfg.get("needs_s", 30) for cfg in group):
            for cfg in group:
                results[cfg["name"]] = {"name": cfg["name"], "error": f"not run: the call's {args.budget_s:.0f} s budget was spent"}
            continue
        for cfg in group:
            if left is not None:
                cfg["timeout"] = min(cfg["timeout"], int(left))
        running = [(cfg, start(cfg, logs, env)) for cfg in group]
        for cfg, proc in running:
            results[cfg["name"]] = finish(cfg, proc)
            print(f"[multi-gpu] {cfg['name']}: {json.dumps(results[cfg['name']])[:400]}", flush=True)
        (out / "results.json").write_text(json.dumps(results, indent=1))
        with tarfile.open(out / "logs.tar.gz", "w:gz") as tf:
            tf.add(logs, arcname="logs")
    table = render(results, args.dry_run)
    (out / "table.md").write_text(table)
    print(table, flush=True)


if __name__ == "__main__":
    main()
