"""Faster QLoRA training on the same numerics: a memory plan made before the weights load, and a
fast path installed on the peft model after it is built.

    plan = plan_for_gpu(model_config, JobShape(seq_len, micro_batch, grad_accum, r, dropout))
    ...load the 4-bit model, add the adapter...
    report = apply_acceleration(model, plan)

`planner` is pure Python (no torch); the rest needs torch: `apply` installs the fast path,
`fused_layer` is the decoder layer as two autograd functions, `fused_ops` its element-wise and LoRA
operations (torch references) with `triton_ops` their GPU kernels, `cuda_graphs` replays the layers
as CUDA graphs, `kernels` and `packing` the per-module functions and padding-free attention.
"""

import os

from .planner import (
    GIB,
    GpuSpec,
    JobShape,
    MemoryPlan,
    ModelShape,
    PlanDoesNotFit,
    fused_layer_wanted,
    plan_memory,
)

# Dense bf16 tensor-core peaks (datasheets): "H100 PCIe" must be looked up before "H100".
PEAK_BF16_FLOPS = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12,
                   "L4": 121e12, "A10": 125e12, "RTX 4090": 165e12}


def gpu_spec(device: int = 0, memory_fraction: float | None = None) -> GpuSpec:
    """The GPU as the planner sees it; `memory_fraction` as set with set_per_process_memory_fraction."""
    import torch

    props = torch.cuda.get_device_properties(device)
    memory = props.total_memory * (memory_fraction or 1.0)
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in props.name), 300e12)
    bandwidth = 4.3e12 if "H200" in props.name else (3.0e12 if "H100" in props.name else 1.5e12)
    return GpuSpec(memory_bytes=int(memory), peak_flops=peak, bandwidth=bandwidth, name=props.name)


def plan_for_gpu(model_config, job: JobShape, policy: str = "auto", device: int = 0,
                 memory_fraction: float | None = None, packing: bool = True,
                 micro_batch: int | None = None, recompute: str | None = None,
                 fused: bool | None = None) -> MemoryPlan:
    """Plan from a transformers config (or its dict) for the GPU this process sees; whether the
    decoder layers run fused: `fused`, or by default QLORA_FUSED_LAYER (planner.fused_layer_wanted),
    and only for an architecture the fused layer takes (ModelShape.fusable)."""
    if fused is None:
        fused = fused_layer_wanted(os.environ.get("QLORA_FUSED_LAYER"))
    return plan_memory(ModelShape.from_hf_config(model_config), job, gpu_spec(device, memory_fraction),
                       policy=policy, packing=packing, micro_batch=micro_batch,
                       recompute=recompute, fused=fused)


def labels_checked_on_host(model) -> None:
    """Tell the fused loss that every batch's labels were checked against the vocabulary on the host
    before they reached the GPU (the trainer's collator: data.check_token_ids), so it skips its own
    check, which would make the host wait for the GPU at every micro-step."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    lm._qlora_labels_checked = True


def apply_acceleration(model, plan: MemoryPlan):
    from .apply import apply_acceleration as _apply

    return _apply(model, plan)


__all__ = [
    "GIB",
    "PEAK_BF16_FLOPS",
    "GpuSpec",
    "JobShape",
    "MemoryPlan",
    "ModelShape",
    "PlanDoesNotFit",
    "apply_acceleration",
    "fused_layer_wanted",
    "gpu_spec",
    "labels_checked_on_host",
    "plan_for_gpu",
    "plan_memory",
]
