"""The two calls the trainer makes (sft.py): a memory plan before the weights load, and the fast
path once the adapter is on.

    plan = trainer_hooks.plan_before_loading(model_files.path, spec)       # may refuse the job
    ...load the 4-bit model, add the adapter...
    training = trainer_hooks.accelerate(model, plan, spec.training)        # the spec the Trainer runs

What runs is the QLoRAJob's `spec.training.acceleration` (path fused | perProjection | plain,
cudaGraphs, memory: the planner's policy auto | lean | max). The trainer's environment keeps three switches for diagnosis, and they can only turn
things off, never on against the spec: QLORA_ACCELERATION=0 (the plain recipe), QLORA_FUSED_LAYER=0
(no fused decoder layers), QLORA_CUDA_GRAPHS=0 (no CUDA graphs). On a CPU, for architectures the
planner does not know, or with the path plain, the plan is None and the trainer runs the plain recipe
unchanged. QLORA_ACCELERATION=cpu runs the fast path on a CPU anyway (torch references instead of
Triton kernels, no CUDA graphs): how the tests drive the GPU path's wiring through the real Trainer;
QLORA_CPU_PLAN_GIB sets the memory of the GPU that such a plan pretends to have (default 64).

With several processes, `plan_layout` decides spec.training.parallelism before the weights download:
the one-GPU plan on every rank (data parallel), or the model sharded across them (sharded_plan.py,
sharding.py), or a DoesNotFit failure naming the smallest GPU count that would hold the job.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace

from . import (
    GIB,
    GpuSpec,
    JobShape,
    MemoryPlan,
    ModelShape,
    PlanDoesNotFit,
    apply_acceleration,
    fused_layer_wanted,
    gpu_spec,
    plan_memory,
)
from .planner import FUSABLE_ARCHITECTURES, FUSED_MAX_RANK
from .sharded_plan import ShardedPlan, does_not_fit_message, plan_sharded, smallest_sharded_world
from .sharded_plan import fits as sharded_fits

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AccelerationChoice:
    """What the trainer runs, from the spec and the environment's diagnosis switches."""

    path: str  # fused | perProjection | plain
    cuda_graphs: bool
    why: str  # where an off switch came from, for the log and training_config.json

    def to_wire(self) -> dict:
        return {"path": self.path, "cudaGraphs": self.cuda_graphs, "why": self.why}


def choose_acceleration(acceleration, environ=os.environ) -> AccelerationChoice:
    """spec.training.acceleration, with QLORA_ACCELERATION=0, QLORA_FUSED_LAYER=0 and
    QLORA_CUDA_GRAPHS=0 able to turn parts off (a bad value of QLORA_FUSED_LAYER is refused)."""
    path, why = acceleration.path, "spec.training.acceleration"
    if environ.get("QLORA_ACCELERATION", "1") == "0" and path != "plain":
        path, why = "plain", "QLORA_ACCELERATION=0"
    if path == "fused" and not fused_layer_wanted(environ.get("QLORA_FUSED_LAYER")):
        path, why = "perProjection", "QLORA_FUSED_LAYER=0"
    graphs = path == "fused" and acceleration.cuda_graphs is not False
    if graphs and environ.get("QLORA_CUDA_GRAPHS", "1") == "0":
        graphs, why = False, "QLORA_CUDA_GRAPHS=0"
    return AccelerationChoice(path, graphs, why)


def _job_and_gpu(model_path, spec, device: int):
    """(shape, job, gpu, on_cpu) for the planner, or None where no plan is made (a CPU, or a config
    the planner cannot read). QLORA_ACCELERATION=cpu plans for a pretend GPU of QLORA_CPU_PLAN_GIB
    (default 64) GiB: how the tests drive the GPU path's wiring and its refusals on a CPU."""
    import torch

    on_cpu = os.environ.get("QLORA_ACCELERATION", "1") == "cpu" and not torch.cuda.is_available()
    if not (torch.cuda.is_available() or on_cpu):
        return None
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(model_path), trust_remote_code=spec.model.trust_remote_code)
    try:
        shape = ModelShape.from_hf_config(config.get_text_config())
    except (TypeError, KeyError, AttributeError) as exc:
        log.info("no memory plan for %s (%s): the plain recipe runs", type(config).__name__, exc)
        return None
    if None in (shape.layers, shape.hidden, shape.intermediate, shape.heads, shape.vocab):
        log.info("no memory plan for %s: its config lacks the sizes the planner needs", type(config).__name__)
        return None
    t = spec.training
    job = JobShape(seq_len=t.max_seq_length, micro_batch=t.batch_size, grad_accum=t.gradient_accumulation_steps,
                   lora_rank=spec.lora.r, lora_dropout=spec.lora.dropout)
    if on_cpu:
        gib = float(os.environ.get("QLORA_CPU_PLAN_GIB", "64"))
        gpu = GpuSpec(memory_bytes=int(gib * GIB), name="cpu (QLORA_ACCELERATION=cpu)")
    else:
        gpu = gpu_spec(device)
    return shape, job, gpu, config


def _does_not_fit(message: str):
    from qlora_api.protocol import ExitCode

    from qlora_trainer.errors import TrainerFailure

    return TrainerFailure(ExitCode.OUT_OF_MEMORY, "DoesNotFit", message)


def plan_before_loading(model_path, spec, device: int = 0) -> MemoryPlan | None:
    """The plan for this job on this GPU, or None. A job that cannot fit fails here, before any
    weights load, with the largest setting that would fit (exit code OUT_OF_MEMORY)."""
    choice = choose_acceleration(spec.training.acceleration)
    if choice.path == "plain":
        log.info("fast path off (%s): the plain recipe runs", choice.why)
        return None
    found = _job_and_gpu(model_path, spec, device)
    if found is None:
        return None
    shape, job, gpu, config = found
    try:
        plan = plan_memory(shape, job, gpu, policy=spec.training.acceleration.memory, packing=spec.training.packing,
                           fused=choice.path == "fused")
    except PlanDoesNotFit as exc:
        raise _does_not_fit(str(exc)) from exc
    if choice.path == "fused" and not shape.fusable:
        log.info("fused decoder layers off: %s is not an architecture they take (%s); its layers run per "
                 "projection", getattr(config, "model_type", type(config).__name__), ", ".join(FUSABLE_ARCHITECTURES))
    elif choice.path == "fused" and not plan.fused_layers:  # the planner's rank ceiling
        log.info("fused decoder layers off: LoRA rank %d is above the fused layer's largest, %d",
                 job.lora_rank, FUSED_MAX_RANK)
    plan = replace(plan, cuda_graphs=choice.cuda_graphs and plan.fused_layers)
    log.info("memory plan: %s", plan.describe())
    return plan


@dataclass(frozen=True)
class Layout:
    """How this job uses its GPUs: the one-GPU plan on each (data parallel, or one process), or the
    model sharded across them with the sharded plan."""

    mode: str  # single | dataParallel | sharded
    plan: MemoryPlan | None = None  # the one-GPU plan every rank runs (not sharded)
    sharded: ShardedPlan | None = None
    why: str = ""

    def describe(self) -> str:
        if self.mode == "sharded":
            return self.sharded.describe() if self.sharded else "sharded (FSDP2 over NF4, plain recipe; no GPU plan)"
        return self.plan.describe() if self.plan else f"{self.mode}, plain recipe (no memory plan)"


def plan_layout(model_path, spec, world_size: int, device: int = 0) -> Layout:
    """spec.training.parallelism for this world, before any weights download: the one-GPU plan (data
    parallel), or sharded when asked for or when only sharding fits. A job that fits neither way
    fails here (DoesNotFit) with the smallest GPU count that would hold it."""
    asked = spec.training.parallelism
    if world_size == 1:
        if asked == "sharded":
            log.info("parallelism sharded with one process: nothing to shard, the one-GPU plan runs")
        return Layout("single", plan_before_loading(model_path, spec, device), why="one process")
    found = _job_and_gpu(model_path, spec, device)
    if asked == "sharded":
        sharded = None
        if found is not None:
            shape, job, gpu, _ = found
            sharded = plan_sharded(shape, job, gpu, world_size)
            if not sharded_fits(sharded):
                raise _does_not_fit(does_not_fit_message(shape, job, gpu, world_size, _one_gpu_verdict(model_path, spec, device)))
        return _log(Layout("sharded", sharded=sharded, why="spec.training.parallelism sharded"))
    try:
        plan = plan_before_loading(model_path, spec, device)
    except Exception as exc:
        from qlora_trainer.errors import TrainerFailure

        if not (isinstance(exc, TrainerFailure) and exc.reason == "DoesNotFit") or found is None:
            raise
        shape, job, gpu, _ = found
        sharded = plan_sharded(shape, job, gpu, world_size)
        if asked == "auto" and sharded_fits(sharded):
            return _log(Layout("sharded", sharded=sharded,
                               why=f"auto: the one-GPU plan does not fit ({exc.message}); sharded over {world_size} does"))
        if asked == "dataParallel":
            smallest = smallest_sharded_world(shape, job, gpu)
            hint = (f"; sharded (spec.training.parallelism: sharded) it would fit on {smallest} GPUs"
                    if smallest else "")
            raise _does_not_fit(f"data parallel needs the one-GPU plan to fit: {exc.message}{hint}") from exc
        raise _does_not_fit(does_not_fit_message(shape, job, gpu, world_size, exc.message)) from exc
    return _log(Layout("dataParallel", plan=plan, why=f"{asked}: the one-GPU plan fits"
                       if asked == "auto" else "spec.training.parallelism dataParallel"))


def _one_gpu_verdict(model_path, spec, device) -> str:
    try:
        plan = plan_before_loading(model_path, spec, device)
    except Exception as exc:
        return getattr(exc, "message", str(exc))
    return "fits (" + plan.describe() + ")" if plan else "no plan"


def _log(layout: Layout) -> Layout:
    log.info("parallelism %s (%s): %s", layout.mode, layout.why, layout.describe())
    return layout


NO_GRAPHS_UNDER_DDP = ("data parallel: CUDA graphs off (a graphed backward writes LoRA gradients past DDP's "
                       "all-reduce hooks); fused layers and packing stay on")
ALL_REDUCE_AFTER_STEP = "allReduceAfterStep"  # gradient_sync.py: no DDP, CUDA graphs stay on
DDP = "ddp"


def gradient_sync_mode(plan: MemoryPlan | None, data_parallel: bool, environ=os.environ) -> str | None:
    """How data-parallel ranks average their gradients: the fast path all-reduces the accumulated
    LoRA gradients once per step itself (gradient_sync.py), so its fused layers keep their CUDA
    graphs; the plain recipe (no plan) uses DistributedDataParallel. QLORA_GRADIENT_SYNC=ddp puts
    the fast path under DDP too (CUDA graphs off): a diagnosis switch, like the others here."""
    if not data_parallel:
        return None
    if plan is None or environ.get("QLORA_GRADIENT_SYNC", "") == DDP:
        return DDP
    return ALL_REDUCE_AFTER_STEP


def for_data_parallel(plan: MemoryPlan | None, data_parallel: bool, environ=os.environ) -> MemoryPlan | None:
    """The plan as it runs with this many ranks: under DDP without CUDA graphs (see accelerate);
    with the step's own all-reduce (gradient_sync_mode) as planned."""
    if plan is None or not plan.cuda_graphs or gradient_sync_mode(plan, data_parallel, environ) != DDP:
        return plan
    log.warning("%s", NO_GRAPHS_UNDER_DDP)
    return replace(plan, cuda_graphs=False)


def accelerate(model, plan: MemoryPlan | None, training, data_parallel: bool = False):
    """Install the fast path and return the TrainingSpec the Trainer should run: the plan's
    micro-batch and accumulation (same effective batch), recompute left to the plan (set per layer,
    so the Trainer must not switch it on for all), and fused AdamW in place of the paged 32-bit one
    (the same update; see planner.OPTIMIZER).

    Under data parallel the ranks average their gradients once per step themselves
    (gradient_sync_mode, gradient_sync.py) and everything stays on. Under DDP (QLORA_GRADIENT_SYNC=ddp)
    the fused layers and packing stay on (their LoRA gradients come out of autograd functions, where
    DDP's hooks see them), but CUDA graphs are switched off: a graphed backward adds the LoRA
    gradients into .grad inside the graph, past the hooks DDP all-reduces from, so the ranks would
    silently train apart."""
    if plan is None:
        return training
    plan = for_data_parallel(plan, data_parallel)
    report = apply_acceleration(model, plan)
    log.info("%s", report.describe())
    update = {"batch_size": plan.micro_batch, "gradient_accumulation_steps": plan.grad_accum,
              "gradient_checkpointing": False}
    if training.optimizer == "paged_adamw_32bit":
        update["optimizer"] = plan.optimizer
    return training.model_copy(update=update)
