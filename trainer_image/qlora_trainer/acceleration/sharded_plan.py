"""How many GPUs a job needs, and whether its 4-bit base is sharded across them, decided before any
weights load (pure Python, like planner.py, so it is unit-tested on any machine).

Two ways to use N GPUs (spec.training.parallelism):
- dataParallel: every GPU holds the whole 4-bit model and runs the one-GPU memory plan (planner.py)
  on its share of the batch; needs the one-GPU plan to fit.
- sharded: FSDP2 over the NF4 weights (sharding.py). Every weight, the embeddings, the LoRA
  parameters and their optimizer states are split N ways; a GPU holds its 1/N, plus the decoder layer
  being computed and the next one (all-gathered just in time, freed after use), plus the plain
  recipe's activations (checkpointed layer inputs, one layer's working set, the loss's logits).
  Sharded runs the plain recipe (no fused layers or CUDA graphs), with frozen floats kept in the
  compute dtype (no fp32 copies of embeddings and norms).
- auto: data parallel when the one-GPU plan fits, sharded when only sharding fits.

Loading is not sharded: each rank quantizes the whole model onto its GPU and then shards it, so the
4-bit model (weights, embeddings, adapter) must fit one GPU while it loads. The plan checks that too
and says so when it is what does not fit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .planner import GIB, GpuSpec, JobShape, ModelShape, _usable, baseline_peak_bytes, static_bytes

PARALLELISM = ("auto", "dataParallel", "sharded")
MAX_GPUS = 1024  # how far the smallest-count search looks


@dataclass(frozen=True)
class ShardedPlan:
    world: int
    predicted_peak_bytes: int  # per GPU while training
    load_peak_bytes: int  # per GPU while the whole 4-bit model sits on it, before sharding
    budget_bytes: int
    breakdown: dict

    def describe(self) -> str:
        return (f"sharded over {self.world} GPUs (FSDP2 over NF4, plain recipe, every layer recomputed): predicted "
                f"peak {self.predicted_peak_bytes / GIB:.2f} GiB per GPU while training and "
                f"{self.load_peak_bytes / GIB:.2f} GiB while loading, of a {self.budget_bytes / GIB:.2f} GiB budget")

    def to_dict(self) -> dict:
        return {"world": self.world, "predicted_peak_bytes": self.predicted_peak_bytes,
                "load_peak_bytes": self.load_peak_bytes, "budget_bytes": self.budget_bytes,
                "breakdown": self.breakdown}


def load_peak_bytes(shape: ModelShape, job: JobShape) -> int:
    """The whole 4-bit model with its adapter in the compute dtype (before sharding)."""
    return int(sum(static_bytes(shape, job.lora_rank, job.adapter_bytes).values()))


def sharded_peak_bytes(shape: ModelShape, job: JobShape, world: int) -> tuple[int, dict]:
    """Per GPU while training sharded over `world` GPUs."""
    static = static_bytes(shape, job.lora_rank, job.adapter_bytes)
    # What the plain recipe needs beyond its weights (fp32 embeddings there: counted separately here).
    plain_static = static["nf4_weights"] + 2 * static["embeddings"] + static["lora_and_optimizer"]
    activations = baseline_peak_bytes(shape, job) - plain_static
    layer_nf4 = static["nf4_weights"] / shape.layers
    layer_lora = static["lora_and_optimizer"] / shape.layers
    parts = {
        "shards": int(sum(static.values()) / world),
        # the layer being computed and the one prefetched, unsharded; their LoRA gradients before
        # the reduce-scatter
        "gathered_layers": int(2 * layer_nf4 + 2 * layer_lora / 4),
        # the embedding table or the LM head, unsharded while it is used (one at a time)
        "gathered_embedding": shape.vocab * shape.hidden * 2,
        "activations": int(activations),
    }
    total = sum(parts.values())
    parts["fragmentation"] = int(0.03 * (total - parts["shards"]))
    return int(total + parts["fragmentation"]), parts


def plan_sharded(shape: ModelShape, job: JobShape, gpu: GpuSpec, world: int) -> ShardedPlan:
    peak, parts = sharded_peak_bytes(shape, job, world)
    return ShardedPlan(world, peak, load_peak_bytes(shape, job), _usable(gpu), parts)


def fits(plan: ShardedPlan) -> bool:
    return plan.predicted_peak_bytes <= plan.budget_bytes and plan.load_peak_bytes <= plan.budget_bytes


def smallest_sharded_world(shape: ModelShape, job: JobShape, gpu: GpuSpec) -> int | None:
    """The fewest GPUs of this kind that hold the job sharded, or None when no count does (the load,
    or the activations, which sharding does not split, exceed one GPU)."""
    budget = _usable(gpu)
    if load_peak_bytes(shape, job) > budget:
        return None
    lo, hi = 1, MAX_GPUS
    if sharded_peak_bytes(shape, job, hi)[0] > budget:
        return None
    while lo < hi:  # the peak falls as the world grows
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if sharded_peak_bytes(shape, job, mid)[0] <= budget else (mid + 1, hi)
    return lo


def does_not_fit_message(shape: ModelShape, job: JobShape, gpu: GpuSpec, world: int, one_gpu_reason: str) -> str:
    """Why `world` GPUs of this kind cannot hold the job, and what would."""
    plan = plan_sharded(shape, job, gpu, world)
    head = (f"this job does not fit on {world} x {gpu.name} ({gpu.memory_bytes / GIB:.1f} GiB each): sharded it needs "
            f"about {plan.predicted_peak_bytes / GIB:.1f} GiB per GPU (budget {plan.budget_bytes / GIB:.1f} GiB)")
    if plan.load_peak_bytes > plan.budget_bytes:
        need = math.ceil((plan.load_peak_bytes + GIB) / 0.92 / GIB)
        return (f"{head}, and each GPU must hold the whole 4-bit model ({plan.load_peak_bytes / GIB:.1f} GiB) while "
                f"it loads, before sharding: no number of these GPUs fits; use GPUs with at least {need} GiB. "
                f"On one GPU: {one_gpu_reason}")
    smallest = smallest_sharded_world(shape, job, gpu)
    if smallest is None:
        return (f"{head}; the activations alone ({plan.breakdown['activations'] / GIB:.1f} GiB, not split by "
                f"sharding) exceed one GPU: no number of these GPUs fits; lower maxSeqLength or batchSize. "
                f"On one GPU: {one_gpu_reason}")
    return (f"{head}; the smallest count that fits is {smallest} GPUs (spec.resources.gpu.count x workers), "
            f"about {sharded_peak_bytes(shape, job, smallest)[0] / GIB:.1f} GiB each. On one GPU: {one_gpu_reason}")
