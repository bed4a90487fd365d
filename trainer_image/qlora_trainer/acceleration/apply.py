"""apply_acceleration(model, plan): put the fast path under a peft + bitsandbytes model in place.

The model stays an ordinary peft model (same parameters, same adapter files, generation and eval
unchanged); what changes is how its modules compute in training:
- Llama-style decoder layers (Llama, Qwen2, Mistral, ...) run as two fused autograd functions
  (fused_layer.py: fused q|k|v and gate|up GEMMs, in-kernel LoRA dropout, Triton norms, RoPE and
  SwiGLU), replayed as CUDA graphs for fixed-length rows (cuda_graphs.py), when the plan says so
  (its default); the plan's fused_layers and cuda_graphs turn them off;
- other LoRA layers over frozen linears run as one autograd function (LoRALinearFunction);
- gated SiLU MLPs (Llama, Qwen2, Mistral, ...) run as one function that keeps x, gate and up;
- Llama-style RMSNorms keep their input and an fp32 scale per token, not fp32 copies of it;
- the residual stream stays fp32, as the plain recipe's, wherever every layer can take it;
- the plan's layers keep a bf16 copy of their NF4 weights (no dequantization per pass);
- the plan's layers recompute in backward (or none, or all with inputs offloaded to host memory);
- attention runs per packed record through variable-length flash attention;
- with labels, the causal-LM forward computes the loss a chunk of tokens at a time.
Anything it does not recognise keeps its own forward, so any HF causal LM still trains.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn

from . import attention, fused_layer
from .forward_patch import replace_forward
from .kernels import (
    FrozenWeight,
    LoRAGatedMLPFunction,
    LoRALinearFunction,
    Projection,
    RMSNormFunction,
    chunked_cross_entropy,
)
from .packing import register_varlen_attention
from .planner import MemoryPlan

log = logging.getLogger(__name__)

_RMSNORM_CLASSES = {"LlamaRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "MistralRMSNorm", "Qwen2MoeRMSNorm",
                    "Phi3RMSNorm", "GraniteRMSNorm", "OlmoRMSNorm", "SmolLM3RMSNorm"}


@dataclass
class AccelerationReport:
    lora_layers: int = 0
    fused_layers: int = 0
    graphed_layers: int = 0
    fused_mlps: int = 0
    rms_norms: int = 0
    cached_layers: int = 0
    cached_bytes: int = 0
    recompute_layers: int = 0
    recompute: str = "none"
    attention: str = "unchanged"
    fused_cross_entropy: bool = False
    recast_to_compute_dtype: int = 0
    residual: str = "compute dtype"  # the residual stream's dtype between the decoder layers
    skipped: list = field(default_factory=list)

    def describe(self) -> str:
        return (f"fast path: {self.lora_layers} LoRA layers, {self.fused_layers} fused decoder layers "
                f"({self.graphed_layers} as CUDA graphs for fixed-length rows), "
                f"{self.fused_mlps} fused MLPs, {self.rms_norms} RMSNorms, "
                f"bf16 weights kept in {self.cached_layers} layers ({self.cached_bytes / 2**30:.2f} GiB), "
                f"recompute {self.recompute} ({self.recompute_layers} layers), attention {self.attention}, "
                f"residual stream {self.residual}, "
                f"chunked cross-entropy {'on' if self.fused_cross_entropy else 'off'}")


def _compute_dtype(model) -> torch.dtype:
    for module in model.modules():
        dtype = getattr(module, "compute_dtype", None)
        if isinstance(dtype, torch.dtype):
            return dtype
    for p in model.parameters():
        if p.is_floating_point() and not p.requires_grad:
            return p.dtype
    return torch.float32


def _is_vanilla_lora(module) -> bool:
    if not (hasattr(module, "lora_A") and hasattr(module, "base_layer")):
        return False
    adapters = list(getattr(module, "active_adapters", []))
    if len(adapters) != 1 or adapters[0] not in module.lora_A:
        return False
    name = adapters[0]
    if getattr(module, "merged", False) or getattr(module, "use_dora", {}).get(name, False):
        return False
    if name in getattr(module, "lora_variant", {}) or getattr(module, "lora_bias", {}).get(name, False):
        return False
    return isinstance(module.lora_A[name], nn.Linear) and module.lora_A[name].bias is None


def _patch_lora_linear(module, dtype) -> None:
    name = module.active_adapters[0]
    drop = module.lora_dropout[name]
    p = drop.p if isinstance(drop, nn.Dropout) else 0.0
    module._qlora_adapter = name
    module._qlora_proj = Projection(FrozenWeight(module.base_layer, dtype), module.scaling[name], p)

    def forward(self, x, *args, **kwargs):
        if (args or kwargs or self.disable_adapters or self.merged
                or list(self.active_adapters) != [self._qlora_adapter]):
            return self._qlora_original_forward(x, *args, **kwargs)
        a, b = self.lora_A[self._qlora_adapter].weight, self.lora_B[self._qlora_adapter].weight
        return LoRALinearFunction.apply(x, a, b, self._qlora_proj, self.training)  # it casts x itself

    replace_forward(module, forward)


def _patch_gated_mlp(mlp) -> bool:
    parts = [getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
    if not all(p is not None and hasattr(p, "_qlora_proj") for p in parts):
        return False
    act = getattr(mlp, "act_fn", None)
    if not isinstance(act, nn.SiLU) and type(act).__name__ not in ("SiLU", "SiLUActivation"):
        return False

    def forward(self, x):
        g, u, d = self.gate_proj, self.up_proj, self.down_proj
        if any(m.disable_adapters or m.merged or list(m.active_adapters) != [m._qlora_adapter] for m in (g, u, d)):
            return self._qlora_original_forward(x)
        weights = []
        for m in (g, u, d):
            weights += [m.lora_A[m._qlora_adapter].weight, m.lora_B[m._qlora_adapter].weight]
        return LoRAGatedMLPFunction.apply(x, *weights, (g._qlora_proj, u._qlora_proj, d._qlora_proj),
                                          self.training)

    replace_forward(mlp, forward)
    return True


def _patch_rmsnorm(norm) -> bool:
    if type(norm).__name__ not in _RMSNORM_CLASSES or not hasattr(norm, "variance_epsilon"):
        return False

    def forward(self, x):
        return RMSNormFunction.apply(x, self.weight, self.variance_epsilon)

    replace_forward(norm, forward)
    norm._qlora_rmsnorm = True
    return True


def _decoder_layers(model) -> list:
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def offloaded_checkpoint(function, *args, **kwargs):
    """Checkpoint whose saved layer input waits in pinned host memory until backward."""
    with torch.autograd.graph.save_on_cpu(pin_memory=True):
        return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False, **kwargs)


def _set_recompute(layers, plan: MemoryPlan) -> int:
    func = offloaded_checkpoint if plan.recompute == "offload" else partial(
        torch.utils.checkpoint.checkpoint, use_reentrant=False)
    count = 0
    for i, layer in enumerate(layers):
        on = i < plan.recompute_layers
        # A fused layer recomputes inside its own functions (it stays graphable); offloading and
        # other layers use torch's checkpoint around the whole layer.
        own = on and hasattr(layer, "_qlora_qkv") and plan.recompute != "offload"
        layer._qlora_recompute = own
        layer.gradient_checkpointing = on and not own
        if on and not own:
            layer._gradient_checkpointing_func = func
        count += on
    return count


def _cache_weights(layers, plan: MemoryPlan) -> tuple[int, int]:
    # Recomputed layers first (they dequantize three times per step, the others twice). With none
    # recomputed, the top layers: the lower ones keep their weights across the turn instead
    # (turn_weights.py), which only layers without a copy can.
    n, total = 0, 0
    chosen = layers[max(0, len(layers) - plan.cached_layers):] if plan.recompute_layers == 0 else layers[:plan.cached_layers]
    for layer in chosen:
        if hasattr(layer, "_qlora_qkv"):
            total += fused_layer.keep_weight_copies(layer)
        else:
            for module in layer.modules():
                proj = getattr(module, "_qlora_proj", None)
                if proj is not None and proj.weight.cache is None:
                    total += proj.weight.keep_copy()
        n += 1
    return n, total


def _install_fused_layers(layers, config, dtype, report, plan: MemoryPlan) -> None:
    if not plan.fused_layers:
        # what would have kept them unfused anyway (a rank above the fused layer's largest, which the
        # trainer plans per projection) is named, so the published report says why
        why = sorted({fused_layer.fusable(layer) for layer in layers} - {None})
        report.skipped.append("decoder layers run per projection: the plan has fused decoder layers off"
                              + (f" ({'; '.join(why)})" if why else ""))
        return
    if config is None:
        return
    reasons = set()
    for layer in layers:
        if fused_layer.install(layer, config, dtype):
            report.fused_layers += 1
        else:
            reasons.add(fused_layer.fusable(layer) or "unknown")
    if reasons:
        report.skipped.append("decoder layers without the fused path: " + "; ".join(sorted(reasons)))


def _upcast_embeddings(module, args, output):
    """Forward hook on the input embeddings: in training, the residual stream starts in fp32."""
    if module.training and torch.is_grad_enabled() and output.dtype != torch.float32:
        return output.float()
    return None


def _cast_to_head_dtype(head, args):
    """Forward pre-hook on the LM head: an fp32 stream's final norm output goes in as the head's
    dtype (what autocast does to the plain recipe's), also where the chunked loss is not patched in."""
    if args and torch.is_tensor(args[0]) and args[0].dtype != head.weight.dtype:
        return (args[0].to(head.weight.dtype),) + tuple(args[1:])
    return None


def _takes_fp32_stream(layer) -> bool:
    """Whether a decoder layer runs on an fp32 residual stream as the plain recipe's does: a fused
    one natively; a per-projection one when each of its norms is this module's RMSNorm (fp32 in,
    fp32 out) and each of its linears belongs to a LoRA projection this module patched (which casts
    its input to the compute dtype for the GEMMs and returns its input's dtype, as bitsandbytes does).
    Anything else (a linear without an adapter, a norm of its own kind) keeps the compute dtype."""
    if hasattr(layer, "_qlora_qkv"):
        return True
    norms = [getattr(layer, n, None) for n in ("input_layernorm", "post_attention_layernorm")]
    if not all(getattr(n, "_qlora_rmsnorm", False) for n in norms):
        return False
    patched = [m for m in layer.modules() if hasattr(m, "_qlora_proj")]
    covered = {id(sub) for m in patched for sub in m.modules()}
    linears = [m for m in layer.modules() if isinstance(m, nn.Linear)]
    return bool(patched) and all(id(m) in covered for m in linears)


def _keep_residual_fp32(lm, layers, dtype, report: AccelerationReport, plan: MemoryPlan,
                        attention_ours: bool) -> None:
    """The plain recipe's residual stream is fp32 (prepare_model_for_kbit_training upcasts the
    embeddings and norms); in bf16 the fast path learned measurably slower at the Llama-3-8B shape
    (benchmarks/results/lora_grad_parity_h200.md), and so did the per-projection path at 8B until
    its projections also returned their fp32 input's dtype
    (benchmarks/results/per_projection_parity_session19_h200.md).
    Fused layers take an fp32 stream natively, per-projection ones when _takes_fp32_stream (and
    attention is varlen_attention_forward, which casts their fp32 q, k and v to the compute dtype);
    when any layer cannot, the whole stream keeps the compute dtype."""
    report.residual = str(dtype).replace("torch.", "")
    if dtype.itemsize >= 4 or not plan.fp32_residual or not layers:
        return  # an fp32 or fp64 model's stream is already at least fp32
    per_projection = [layer for layer in layers if not hasattr(layer, "_qlora_qkv")]
    if not all(_takes_fp32_stream(layer) for layer in layers) or (per_projection and not attention_ours):
        return
    embed = lm.get_input_embeddings() if hasattr(lm, "get_input_embeddings") else None
    if embed is None:
        return
    for layer in layers:
        if hasattr(layer, "_qlora_qkv"):
            layer._qlora_residual = torch.float32
        elif getattr(layer, "self_attn", None) is not None:
            layer.self_attn._qlora_compute_dtype = dtype  # its fp32 q, k and v: varlen_attention_forward
    embed.register_forward_hook(_upcast_embeddings)
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    if head is not None and hasattr(head, "weight"):
        head.register_forward_pre_hook(_cast_to_head_dtype)
    report.residual = "float32"


def _patch_causal_lm_loss(lm, plan: MemoryPlan) -> bool:
    config = getattr(lm, "config", None)
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    backbone = getattr(lm, getattr(lm, "base_model_prefix", "model"), None)
    if config is None or head is None or backbone is None or getattr(head, "bias", None) is not None:
        return False
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None) \
            or getattr(config, "logits_scaling", None):
        return False
    prefix = getattr(lm, "base_model_prefix", "model")  # the backbone, looked up on self (replace_forward)

    def forward(self, input_ids=None, labels=None, num_items_in_batch=None, **kwargs):
        head = self.get_output_embeddings()
        if labels is None or not self.training or head.weight.requires_grad:
            if labels is not None:
                kwargs["labels"] = labels
            if num_items_in_batch is not None:
                kwargs["num_items_in_batch"] = num_items_in_batch
            return self._qlora_original_forward(input_ids=input_ids, **kwargs)
        from transformers.modeling_outputs import CausalLMOutputWithPast

        kwargs.pop("logits_to_keep", None)
        kwargs["use_cache"] = False
        if kwargs.get("position_ids") is None and kwargs.get("cu_seq_lens_q") is None and input_ids is not None:
            # Fixed-length rows, each one record (right padding, if any, comes after the tokens and
            # causal attention never looks forward): static boundaries, so the layers can replay
            # as CUDA graphs (transformers would otherwise pass fresh position_ids every step).
            cu, longest = fused_layer.rows_pack(input_ids.shape[0], input_ids.shape[1], input_ids.device)
            kwargs.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest)
        out = getattr(self, prefix)(input_ids=input_ids, **kwargs)
        hidden = out.last_hidden_state.to(head.weight.dtype)  # an fp32 residual stream: the LM head runs in bf16
        shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:].to(hidden.device)
        # labels the trainer's collator already checked on the host (data.check_token_ids) are not
        # checked again here: that check reads the GPU's answer and stalls every micro-step
        loss = chunked_cross_entropy(hidden, head.weight, shifted, num_items_in_batch, plan.ce_chunk_tokens,
                                     check_labels=not getattr(self, "_qlora_labels_checked", False))
        return CausalLMOutputWithPast(loss=loss, logits=None)

    replace_forward(lm, forward)
    # training_loop.LeanSFTTrainer sends the training loss here rather than through trl's LM head
    lm._qlora_fused_loss = True
    return True


def _recast_frozen_floats(model, dtype) -> int:
    """Undo peft's prepare_model_for_kbit_training upcast of frozen norms and embeddings to fp32:
    they were loaded in the compute dtype, so casting back is exact, and the residual stream stays
    in the compute dtype instead of making a round trip through fp32 at every layer."""
    if dtype == torch.float32:
        return 0
    n = 0
    for p in model.parameters():
        if not p.requires_grad and p.dtype == torch.float32 and p.__class__.__name__ != "Params4bit":
            p.data = p.data.to(dtype)
            n += 1
    return n


def apply_acceleration(model, plan: MemoryPlan) -> AccelerationReport:
    """Install the fast path on a peft model (see the module docstring). Returns what it did."""
    report = AccelerationReport()
    dtype = _compute_dtype(model)
    report.recast_to_compute_dtype = _recast_frozen_floats(model, dtype)
    for module in model.modules():
        if _is_vanilla_lora(module):
            _patch_lora_linear(module, dtype)
            report.lora_layers += 1
    for module in model.modules():
        if all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj")) and _patch_gated_mlp(module):
            report.fused_mlps += 1
        elif _patch_rmsnorm(module):
            report.rms_norms += 1
    layers = _decoder_layers(model)
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(lm, "config", None)
    _install_fused_layers(layers, config.get_text_config() if config is not None else None, dtype, report, plan)
    attention_ours = False
    try:
        name = register_varlen_attention()
        if hasattr(lm, "set_attn_implementation"):
            lm.set_attn_implementation(name)
        else:
            lm.config._attn_implementation = name
        attention_ours = True
        report.attention = "varlen flash (per packed record)"
        if report.fused_layers:  # the fused layers call their kernels directly (attention.py)
            fused = next(layer for layer in layers if hasattr(layer, "_qlora_qkv"))
            report.attention = f"fused layers: {attention.describe(fused.input_layernorm.weight.device)}"
            if report.fused_layers < len(layers):
                report.attention += "; other layers: varlen flash (per packed record)"
    except Exception as exc:  # an architecture that refuses custom attention keeps its own
        report.skipped.append(f"attention: {exc}")
    _keep_residual_fp32(lm, layers, dtype, report, plan, attention_ours)
    report.recompute = plan.recompute
    report.recompute_layers = _set_recompute(layers, plan)
    if report.fused_layers:
        report.graphed_layers = fused_layer.install_graphs(layers, enabled=plan.cuda_graphs)
    report.cached_layers, report.cached_bytes = _cache_weights(layers, plan)
    report.fused_cross_entropy = _patch_causal_lm_loss(lm, plan)
    if not report.lora_layers:
        report.skipped.append("no vanilla LoRA layers found: adapters keep peft's forward")
    log.info("%s", report.describe())
    return report
