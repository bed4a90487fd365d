"""The two calls the trainer makes (sft.py): a memory plan before the weights load, and the fast
path once the adapter is on.

    plan = trainer_hooks.plan_before_loading(model_files.path, spec)       # may refuse the job
    ...load the 4-bit model, add the adapter...
    training = trainer_hooks.accelerate(model, plan, spec.training)        # the spec the Trainer runs

What runs is the QLoRAJob's `spec.training.acceleration` (path fused | perProjection | plain,
cudaGraphs). The trainer's environment keeps three switches for diagnosis, and they can only turn
things off, never on against the spec: QLORA_ACCELERATION=0 (the plain recipe), QLORA_FUSED_LAYER=0
(no fused decoder layers), QLORA_CUDA_GRAPHS=0 (no CUDA graphs). On a CPU, for architectures the
planner does not know, or with the path plain, the plan is None and the trainer runs the plain recipe
unchanged. QLORA_ACCELERATION=cpu runs the fast path on a CPU anyway (torch references instead of
Triton kernels, no CUDA graphs): how the tests drive the GPU path's wiring through the real Trainer.
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
    plan_for_gpu,
    plan_memory,
)

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


def plan_before_loading(model_path, spec) -> MemoryPlan | None:
    """The plan for this job on this GPU, or None. A job that cannot fit fails here, before any
    weights load, with the largest setting that would fit (exit code OUT_OF_MEMORY)."""
    import torch

    choice = choose_acceleration(spec.training.acceleration)
    mode = os.environ.get("QLORA_ACCELERATION", "1")
    on_cpu = mode == "cpu" and not torch.cuda.is_available()  # the fast path on torch references: tests
    if choice.path == "plain":
        log.info("fast path off (%s): the plain recipe runs", choice.why)
        return None
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
    try:
        if on_cpu:
            plan = plan_memory(shape, job, GpuSpec(memory_bytes=64 * GIB, name="cpu (QLORA_ACCELERATION=cpu)"),
                               packing=t.packing, fused=choice.path == "fused")
        else:
            plan = plan_for_gpu(config.get_text_config(), job, packing=t.packing, fused=choice.path == "fused")
    except PlanDoesNotFit as exc:
        from qlora_api.protocol import ExitCode

        from qlora_trainer.errors import TrainerFailure

        raise TrainerFailure(ExitCode.OUT_OF_MEMORY, "DoesNotFit", str(exc)) from exc
    plan = replace(plan, cuda_graphs=choice.cuda_graphs)
    log.info("memory plan: %s", plan.describe())
    return plan


def accelerate(model, plan: MemoryPlan | None, training):
    """Install the fast path and return the TrainingSpec the Trainer should run: the plan's
    micro-batch and accumulation (same effective batch), recompute left to the plan (set per layer,
    so the Trainer must not switch it on for all), and fused AdamW in place of the paged 32-bit one
    (the same update; see planner.OPTIMIZER)."""
    if plan is None:
        return training
    report = apply_acceleration(model, plan)
    log.info("%s", report.describe())
    update = {"batch_size": plan.micro_batch, "gradient_accumulation_steps": plan.grad_accum,
              "gradient_checkpointing": False}
    if training.optimizer == "paged_adamw_32bit":
        update["optimizer"] = plan.optimizer
    return training.model_copy(update=update)
