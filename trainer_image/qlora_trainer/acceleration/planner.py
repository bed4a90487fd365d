"""The memory plan: how a QLoRA job uses the GPU it landed on, decided before any weights load.

A plan fixes the micro-batch and gradient accumulation (their product, the effective batch, is the
job's and never changes), how many decoder layers recompute their activations in the backward pass
(none, some, all, or all with the saved layer inputs offloaded to host memory), how many layers
keep a dequantized bf16 copy of their frozen NF4 weights (no dequantization per pass), and the
token chunk of the fused cross-entropy (the full-vocabulary logits are never built).

Pure Python on purpose: it runs before torch touches the GPU and is unit-tested on any machine.
Every number below is an estimate in bytes per token per layer, or a time in a simple roofline
model; `benchmarks/NOTES.md` compares them with what was measured.

Budget policy ("auto"): the plan never needs more memory than the standard recipe would for the same
job (full recompute, full fp32 logits), nor more than the card has less a margin. Within that it
takes the fastest plan, and among plans within 3% of the fastest the one that needs least memory.
When the card is tight (less than 1.5x what the standard recipe needs), it goes lean: full
recompute with the smallest micro-batch that still feeds the matrix units, so that variable-length
batches and fragmentation keep their margin.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

from .turn_weights import kept_across_turn

GIB = 1024**3
# The largest LoRA rank the fused decoder layer takes (fused_layer.fusable): its epilogue kernels
# hold a token block's q|k|v adapter columns (3r) and B's [3r, head] tiles at once, so registers and
# shared memory grow with r (lora_rope_ takes 3r <= 256). The GPU checks compare the fused layer
# with fp32 at ranks 8 to 64 (benchmarks/speed_vs_unsloth.py, rank_sweep_checks); above 64 the
# layers run per projection, and the plan is made for that.
FUSED_MAX_RANK = 64
RECOMPUTE_MODES = ("none", "selective", "full", "offload")
# The budget policies (module docstring); spec.training.acceleration.memory offers the same names.
MEMORY_POLICIES = ("auto", "lean", "max")

# Roofline constants (H100-class defaults; `GpuSpec` overrides). Calibrated in benchmarks/NOTES.md.
_GEMM_TOKENS_HALF_EFFICIENCY = 64  # tokens per micro-step at which GEMMs run at half their peak
_GEMM_EFFICIENCY = 0.70  # best achieved fraction of the dense peak for these shapes
# Host-side cost per decoder layer per micro-step (fwd + bwd), measured on an H100 host: the fused
# layer (~130 kernels and ~250 Python-level torch calls) 10.6 ms, the unfused path 12.9 ms
# (benchmarks/NOTES.md). Small micro-steps are host-bound: fewer, larger micro-steps win.
_LAYER_OVERHEAD_S = 0.0105
_UNFUSED_LAYER_OVERHEAD_S = 0.0129
_DEQUANT_OVERHEAD_S = 0.0004  # host cost of dequantizing one layer's 7 weights (one pass)
# Fitted to eight measured plans on an H100 (1.5B and 7B, micro-batches 1-8, no/selective/full/
# offloaded recompute; within ~5% of every one, benchmarks/NOTES.md): the GEMMs run near a constant
# efficiency from 1,024 tokens up, and what makes small micro-steps slow is a fixed cost per layer
# per micro-step (dequantization, the LoRA side's small kernels), not the GEMMs themselves.
# Dequantization per weight and pass, in bytes at the card's copy bandwidth. Its traffic is 2.6 B
# (read 0.53 B, write 2 B, and the absmax), but measured it costs more: on an H200 (4.3 TB/s) the
# 8B row's profile (benchmarks/NOTES.md, session 8, call 1: 2 micro-steps x 32 layers x 2 passes
# of 218M weights, 27.9G weights a step) spent 36 ms a step in bitsandbytes' dequantization (33.5 ms
# at ~2.1 TB/s, half the card's copy rate, plus 2.7 ms decoding the nested absmax), and ~25 ms
# after the Triton NF4 kernel replaced it (call 2). 25 ms x 4.3e12 B/s / 27.9e9 weights = 3.85 B.
# With 2.6 the model put it at 17 ms a step and under-priced what a bf16 weight copy saves.
_DEQUANT_BYTES = 3.85
_ATTENTION_EFFICIENCY = 0.20  # causal flash attention forward + backward, counted as dense FLOPs
_CE_BYTES_PER_LOGIT = 10  # the LM head writes bf16 logits, the loss kernel reads them twice and writes the gradient, the GEMM reads it
_LAYER_FIXED_GPU_S = 0.0006  # per layer per micro-step, forward and backward
_ELEMENTWISE_PASSES = 16  # passes over a layer's saved activations (norms, RoPE, SwiGLU, LoRA A side, copies)
_GRAPH_REPLAY_S = 0.0004  # host cost of one graphed layer's forward and backward replays (estimate)
_STEP_OVERHEAD_S = 0.010  # fused AdamW step, clipping, data: per optimizer step
# The loss runs eagerly (outside the layer graphs), four launches per chunk: the LM-head GEMM, the
# loss kernel, the gradient GEMM and its copy. Host time per chunk (estimate: ~10 us a launch).
_CE_CHUNK_HOST_S = 0.00005
# bitsandbytes' optimizers synchronize the GPU after every parameter: 35-50 ms per step for the ~400
# LoRA tensors of a 1.5B-8B model against 8-11 ms for fused AdamW (measured, benchmarks/NOTES.md).
# LoRA's optimizer states are small and counted in the plan, so paging buys nothing once the plan
# fits: the plan asks for fused AdamW (the same 32-bit AdamW update).
OPTIMIZER = "adamw_torch_fused"

# The architectures whose decoder layers fused_layer.fusable takes (Llama-style RMSNorm, SiLU-gated
# MLP, rotary q/k/v/o attention): model type -> the prefix of its RMSNorm class (fused_layer checks
# the class). Any other architecture runs per projection, so it is planned so (ModelShape.fusable):
# planned as fused, a GPT-NeoX job got the fused layers' activation estimate and host cost, a plan
# 2.2x slower than the plain recipe at 1.3x its memory (benchmarks/NOTES.md, session 20).
FUSABLE_ARCHITECTURES = {"llama": "Llama", "qwen2": "Qwen2", "mistral": "Mistral", "smollm3": "SmolLM3",
                         "granite": "Granite"}
# Architectures whose MLP is two matrices (up, activation, down) where Llama's is three (gate, up,
# down), by model type. Counted as three, a GPT-NeoX layer's weights came out a third
# too large, and with them the plain recipe's memory (13.1 GiB planned against 10.17 measured),
# the plan's own memory and time, and the MFU the benchmark reports (benchmarks/NOTES.md, session 21).
UNGATED_MLP_ARCHITECTURES = ("gpt_neox", "gpt2", "gptj", "gpt_neo", "gpt_bigcode", "phi", "falcon", "opt", "bloom",
                             "starcoder2", "codegen", "mpt", "persimmon", "biogpt", "xglm")
# Saving a layer's input to host memory (apply.offloaded_checkpoint: torch's save_on_cpu) blocks:
# the copy to pinned memory runs on the compute stream and the host waits for it, and the copy back
# runs in the backward's path. Measured on an H200 (Pythia-6.9B's shape, 4,096-token micro-steps,
# 2.15 GB out and back a step): the offloaded plan's step 114 ms longer than full recompute's
# (662.5 against 548.4 ms), about 19 GB/s, with nothing overlapped (benchmarks/NOTES.md, session 21).
# Priced as overlapping 80% of its 25 GB/s, offload looked free, and the 3% rule picked it over full
# recompute for a memory saving of 0.16 GiB at 0.83x the speed.
_OFFLOAD_BYTES_PER_S = 19e9


def fused_layer_wanted(setting: str | None) -> bool:
    """Whether plans use the fused decoder layer (fused_layer.py): yes unless QLORA_FUSED_LAYER=0,
    which keeps the per-projection functions (a way around a suspected fused-path problem)."""
    if setting not in (None, "", "0", "1"):
        raise ValueError(f"QLORA_FUSED_LAYER must be 0 or 1, got {setting!r}")
    return setting != "0"


class PlanDoesNotFit(ValueError):
    """The job cannot run on this GPU in any plan; the message says what would fit."""


@dataclass(frozen=True)
class ModelShape:
    """What the planner needs to know of a decoder-only transformer (from its HF config)."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool = False
    fusable: bool = True  # an architecture the fused decoder layer takes (FUSABLE_ARCHITECTURES)
    mlp_matrices: int = 3  # 3: gated (gate, up, down); 2: up and down (UNGATED_MLP_ARCHITECTURES)

    @classmethod
    def from_hf_config(cls, config) -> ModelShape:
        get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
        heads = get("num_attention_heads")
        hidden = get("hidden_size")
        model_type = get("model_type")
        ungated = model_type in UNGATED_MLP_ARCHITECTURES
        # the MLP's width under its other names (OPT's ffn_dim, Falcon's ffn_hidden_size, GPT-2's
        # n_inner); an ungated MLP left unset is 4x the hidden size, as those models build it
        widths = (get(k) for k in ("intermediate_size", "ffn_dim", "ffn_hidden_size", "n_inner"))
        intermediate = next((w for w in widths if w is not None), None)
        if intermediate is None and ungated and hidden is not None:
            intermediate = 4 * hidden
        return cls(
            layers=get("num_hidden_layers"),
            hidden=hidden,
            intermediate=intermediate,
            heads=heads,
            kv_heads=get("num_key_value_heads") or heads,
            head_dim=get("head_dim") or hidden // heads,
            vocab=get("vocab_size"),
            tied_embeddings=bool(get("tie_word_embeddings", False)),
            fusable=model_type in FUSABLE_ARCHITECTURES,
            mlp_matrices=2 if ungated else 3,
        )

    @property
    def q_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def linear_params_per_layer(self) -> int:
        h, i = self.hidden, self.intermediate
        return h * self.q_width * 2 + h * self.kv_width * 2 + self.mlp_matrices * h * i

    @property
    def linear_params(self) -> int:
        return self.layers * self.linear_params_per_layer

    def lora_params(self, rank: int) -> int:
        h, i, q, kv = self.hidden, self.intermediate, self.q_width, self.kv_width
        per_layer = (h + q) * 2 + (h + kv) * 2 + (h + i) * self.mlp_matrices
        return self.layers * rank * per_layer

    def flops_per_token(self, seq_len: int) -> float:
        """Useful training FLOPs per token: forward and input-gradient matmuls of the frozen base
        (4 per weight; the base has no weight gradients), the LM head, and causal attention."""
        linear = 4.0 * (self.linear_params + self.vocab * self.hidden)
        # Causal attention: 2*s*d per token per layer forward (QK^T and PV, half masked), ~3x with backward.
        attention = 3.0 * self.layers * 2 * seq_len * self.q_width
        return linear + attention


@dataclass(frozen=True)
class JobShape:
    """The job as the user wrote it: the effective batch is micro_batch x grad_accum sequences."""

    seq_len: int
    micro_batch: int
    grad_accum: int
    lora_rank: int = 16
    lora_dropout: float = 0.05
    # Bytes per element of the LoRA weights as they train: 2, since trl's SFTTrainer casts a quantized
    # model's adapter to bf16 (the QLoRA paper's recipe) and torch's AdamW keeps its moments in the
    # parameter's dtype; 4 for an adapter left in fp32 (peft's default outside the Trainer).
    adapter_bytes: int = 2

    @property
    def effective_batch(self) -> int:
        return self.micro_batch * self.grad_accum


@dataclass(frozen=True)
class GpuSpec:
    memory_bytes: int
    peak_flops: float = 989e12  # dense bf16
    bandwidth: float = 3.0e12  # bytes/s, measured copy rate
    name: str = "gpu"


@dataclass
class MemoryPlan:
    micro_batch: int
    grad_accum: int
    recompute: str  # none | selective | full | offload
    recompute_layers: int  # how many decoder layers recompute (== layers for full/offload)
    cached_layers: int  # layers keeping a bf16 copy of their NF4 weights
    ce_chunk_tokens: int
    packing: bool
    predicted_peak_bytes: int
    predicted_tokens_per_s: float
    budget_bytes: int
    policy: str
    optimizer: str = "adamw_torch_fused"
    breakdown: dict = field(default_factory=dict)
    fused_layers: bool = True  # decoder layers as fused_layer.py's functions (else per projection)
    cuda_graphs: bool = True  # fused layers of fixed-length rows replayed as CUDA graphs
    fp32_residual: bool = True  # the decoder layers keep the residual stream in fp32, as the plain recipe
    turn_layers: int = 0  # layers planned to keep their weights across the turn (turn_weights.py)

    def describe(self) -> str:
        return (
            f"micro-batch {self.micro_batch} x accumulation {self.grad_accum}, recompute {self.recompute}"
            f" ({self.recompute_layers} layers), bf16 weight copies in {self.cached_layers} layers,"
            + (f" weights kept across the turn in {self.turn_layers} layers,"
               if self.turn_layers and self.cuda_graphs and self.fused_layers else "") +
            f" cross-entropy in chunks of {self.ce_chunk_tokens} tokens, packing {'on' if self.packing else 'off'},"
            f" fused decoder layers {('on' + ('' if self.cuda_graphs else ', no CUDA graphs')) if self.fused_layers else 'off'},"
            f" {self.optimizer};"
            f" predicted peak {self.predicted_peak_bytes / GIB:.2f} GiB of a {self.budget_bytes / GIB:.2f} GiB"
            f" budget ({self.policy}), about {self.predicted_tokens_per_s:,.0f} tokens/s"
        )

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# Memory model (bytes)


def static_bytes(shape: ModelShape, lora_rank: int, adapter_bytes: int = 2) -> dict:
    """Weights and optimizer: NF4 with double quantization (4 bits + an 8-bit absmax per 64 weights
    + an fp32 scale per 256 absmax), bf16 embeddings/LM head, and the LoRA weights with their
    gradients and AdamW's two moments, all four in the adapter's dtype (`adapter_bytes`, JobShape:
    bf16 as the Trainer trains it, 8 bytes per LoRA parameter; 16 for an fp32 adapter)."""
    nf4 = shape.linear_params * (0.5 + 1 / 64 + 4 / (64 * 256))
    embed = shape.vocab * shape.hidden * 2 * (1 if shape.tied_embeddings else 2)
    lora = shape.lora_params(lora_rank) * 4 * adapter_bytes
    return {"nf4_weights": int(nf4), "embeddings": int(embed), "lora_and_optimizer": int(lora)}


# Both paths keep the residual stream (the layers' inputs, the gradient between them) in fp32 as the
# plain recipe does (fused_layer.py, apply._keep_residual_fp32, MemoryPlan.fp32_residual); a
# per-projection layer with a linear outside LoRA or a norm of another kind keeps the compute dtype
# (planned as fp32 all the same: the estimate stays on the safe side).
RESIDUAL_BYTES = 4


def activation_bytes_per_token_layer(shape: ModelShape, dropout: float, fused: bool = True) -> int:
    """What a decoder layer keeps for backward, per token, with nothing recomputed.
    Fused (fused_layer.py): both blocks' inputs, the qkv buffer, the attention output and its fp32
    logsumexp, gate|up, and the small LoRA A-side activations (r=16 assumed; masks are redrawn).
    Per projection: the norm inputs, the attention input and the MLP input (the norms' outputs,
    which the projections keep as they came), all four on the residual stream's fp32; q/k/v after
    RoPE and the attention output (and its reshaped copy for o_proj) in the compute dtype; gate and
    up in the stream's fp32 (kernels.LoRAGatedMLPFunction: a projection returns its input's dtype,
    as bitsandbytes does; an ungated MLP keeps its up projection's output and the activation's, the
    same two widths); and a 1-byte dropout mask per LoRA input when dropout is on."""
    h, i, q, kv = shape.hidden, shape.intermediate, shape.q_width, shape.kv_width
    if not fused:
        return (RESIDUAL_BYTES * (4 * h + 2 * i) + 2 * (q + 2 * kv + q)
                + (((2 + shape.mlp_matrices) * h + q + i) if dropout > 0 else 0))
    return 2 * (q + 2 * kv + q + 2 * i + 7 * 16) + RESIDUAL_BYTES * 2 * h + 4 * shape.heads


def recompute_a_sides_bytes_per_token(lora_rank: int) -> int:
    """What a fused layer that recomputes keeps besides its input: its LoRA A-side products in the
    compute dtype (q|k|v 3r, o_proj r, gate|up 2r, down_proj r: fused_layer.ASides), which its
    recompute reuses instead of running the masked A side again."""
    return 2 * 7 * lora_rank


def transient_bytes_per_token(shape: ModelShape, fused: bool = True) -> int:
    """Working memory of the layer being run backward, beyond what it saved: in the fused MLP's
    backward the SwiGLU output's gradient and gate|up's gradient live together (SwiGLU's output,
    which down_proj's A gradient reads, is written over its gradient), plus a few hidden-size
    gradients. Per projection on the fp32 stream (kernels.LoRAGatedMLPFunction.backward) SiLU's
    output, the SwiGLU output's gradient and gate's and up's gradients, fp32, live together with
    a compute-dtype copy of one of them for the GEMMs (an ungated MLP: the activation's output
    gradient and its input gradient)."""
    if not fused:
        return (RESIDUAL_BYTES * 2 * (shape.mlp_matrices - 1) * shape.intermediate
                + 2 * (shape.intermediate + 2 * shape.hidden))
    return 2 * (3 * shape.intermediate + 2 * shape.hidden)


def ce_chunk_bytes(shape: ModelShape, chunk_tokens: int) -> int:
    """One chunk of the fused cross-entropy: its bf16 logits, which the loss kernel overwrites with
    their gradient (fused_ops.cross_entropy_rows_)."""
    return chunk_tokens * shape.vocab * 2


CE_WORK_BYTES = int(1.5 * GIB)  # logits work per cross-entropy chunk
# The lean plan may also take a third of it. The loss runs in the forward pass (the gradient over
# the hidden states is made there, kernels.ChunkedLinearCrossEntropy), before any layer's backward:
# its chunk and a layer's backward working set are never live together (plan_peak_bytes), so a
# larger chunk costs lean nothing until the chunk outgrows that working set (a small model with a
# large vocabulary). Lean takes the larger chunk where its peak stays within the lean cap.
CE_WORK_CHOICES = {"lean": (CE_WORK_BYTES, CE_WORK_BYTES // 3)}


def choose_ce_chunk(shape: ModelShape, tokens: int, work_bytes: int = CE_WORK_BYTES) -> int:
    """About `work_bytes` of logits work per chunk (1.5 GiB: large enough for an efficient LM-head
    GEMM), at least 256 tokens, at most the micro-step."""
    chunk = max(256, int(work_bytes // (shape.vocab * 10)) // 256 * 256)
    return max(1, min(chunk, tokens))


def plan_peak_bytes(shape: ModelShape, job: JobShape, micro_batch: int, recompute_layers: int,
                    cached_layers: int, offload: bool = False, ce_work_bytes: int = CE_WORK_BYTES,
                    graphs: bool = False, fused: bool = True) -> tuple[int, dict]:
    tokens = micro_batch * job.seq_len
    static = static_bytes(shape, job.lora_rank, job.adapter_bytes)
    kept_layers = shape.layers - recompute_layers
    act = activation_bytes_per_token_layer(shape, job.lora_dropout, fused)
    # A recomputed layer keeps its input (a fused one also its A sides); offloaded layers, under
    # torch's checkpoint, keep nothing on the GPU.
    kept_per_recomputed = RESIDUAL_BYTES * shape.hidden + (recompute_a_sides_bytes_per_token(job.lora_rank) if fused else 0)
    checkpoints = 0 if offload else recompute_layers * kept_per_recomputed
    parts = dict(static)
    parts["bf16_weight_copies"] = cached_layers * shape.linear_params_per_layer * 2
    parts["activations"] = tokens * (kept_layers * act + checkpoints)
    # Recomputing a layer rebuilds its activations while its backward runs.
    parts["recompute_working_set"] = tokens * act if recompute_layers else 0
    parts["transient"] = tokens * (transient_bytes_per_token(shape, fused) + 4 * RESIDUAL_BYTES * shape.hidden)
    chunk = choose_ce_chunk(shape, tokens, ce_work_bytes)
    parts["cross_entropy"] = ce_chunk_bytes(shape, chunk) + tokens * shape.hidden * 2
    # A dequantized weight of the largest matrix (not cached) lives while its matmul runs; a layer
    # that recomputes inside the fused functions holds all its dequantized weights through its
    # recompute and backward (fused_layer.held_weights). Offloaded layers recompute under torch's
    # checkpoint instead: their fused functions run as in a plain forward and backward, one
    # dequantized matrix at a time (apply._set_recompute), so they hold only the largest, gate|up
    # (at 70B the whole layer is 1.6 GiB, gate|up 0.9).
    holds_layer = recompute_layers > cached_layers and not offload
    held = shape.linear_params_per_layer * 2 if holds_layer else 2 * shape.hidden * shape.intermediate * 2
    parts["dequant_buffer"] = held if cached_layers < shape.layers else 0
    if graphs:  # chained graphs: two gradient buffers and the last layer's output (cuda_graphs.py)
        parts["cuda_graph_buffers"] = 3 * tokens * shape.hidden * RESIDUAL_BYTES
    # The loss runs before any layer's backward: its chunk and a layer's backward working set are
    # never live together, so the peak takes the larger of the two.
    layer_phase = parts["recompute_working_set"] + parts["transient"] + parts["dequant_buffer"]
    total = sum(parts.values()) - min(layer_phase, parts["cross_entropy"])
    parts["fragmentation"] = int(0.03 * (total - static["nf4_weights"] - static["embeddings"]))
    return int(total + parts["fragmentation"]), parts


def baseline_peak_bytes(shape: ModelShape, job: JobShape) -> int:
    """The standard recipe (what this plan must never exceed): peft + bitsandbytes, norms and
    embeddings upcast to fp32, checkpointing on every layer with fp32 hidden states, and the loss
    over full-vocabulary logits (bf16 logits, their fp32 copy, log-softmax and its gradient). The
    recomputed layer's MLP holds five intermediate-wide fp32 tensors and two bf16 ones when gated,
    three and one when not (shape.mlp_matrices)."""
    tokens = job.micro_batch * job.seq_len
    static = static_bytes(shape, job.lora_rank, job.adapter_bytes)
    embed_fp32 = static["embeddings"] * 2
    # its paged 32-bit AdamW keeps fp32 moments whatever the adapter's dtype
    lora = shape.lora_params(job.lora_rank) * (2 * job.adapter_bytes + 8)
    h, i = shape.hidden, shape.intermediate
    checkpoints = shape.layers * tokens * h * 4
    m = shape.mlp_matrices
    layer_eager = tokens * (4 * (10 * h + (2 * m - 1) * i) + 2 * (3 * h + (m - 1) * i))
    logits = tokens * shape.vocab * (2 + 4 + 4 + 4)
    return int(static["nf4_weights"] + embed_fp32 + lora + checkpoints + layer_eager + logits)


# ---------------------------------------------------------------------------------------------
# Speed model (seconds per optimizer step)


def _gemm_efficiency(tokens: int) -> float:
    return _GEMM_EFFICIENCY * tokens / (tokens + _GEMM_TOKENS_HALF_EFFICIENCY)


def turn_layers(shape: ModelShape, cached_layers: int, tokens: int, recompute_layers: int, graphs: bool,
                fused: bool) -> int:
    """Layers whose next forward finds its weights kept across the turn (turn_weights.py): only
    graphed fused layers with none recomputed (cuda_graphs.LayerGraphs._turn_layout)."""
    if not (graphs and fused and recompute_layers == 0):
        return 0
    return kept_across_turn(shape.layers, cached_layers, tokens, shape.hidden, shape.intermediate, shape.q_width,
                            shape.kv_width, RESIDUAL_BYTES)


def step_seconds(shape: ModelShape, job: JobShape, gpu: GpuSpec, micro_batch: int, recompute_layers: int,
                 cached_layers: int, offload: bool = False, graphs: bool = False, fused: bool = True,
                 ce_chunk: int | None = None) -> float:
    tokens = micro_batch * job.seq_len
    accum = job.effective_batch // micro_batch
    eff = _gemm_efficiency(tokens)
    frac_recomputed = recompute_layers / shape.layers
    linear = 2.0 * shape.linear_params * tokens * (2 + frac_recomputed)
    # The LM head's two GEMMs run a loss chunk at a time (ce_chunk tokens; default: the chunk the
    # full logits work would give).
    chunk = min(tokens, ce_chunk or choose_ce_chunk(shape, tokens))
    head = 4.0 * shape.vocab * shape.hidden * tokens
    attention = shape.layers * 2 * job.seq_len * shape.q_width * tokens * (3 + frac_recomputed)
    gemm_s = (linear / (gpu.peak_flops * eff) + head / (gpu.peak_flops * _gemm_efficiency(chunk))
              + attention / (gpu.peak_flops * _ATTENTION_EFFICIENCY))
    # Dequantizing one layer: read 0.53 B/weight, write 2 B, and the GEMM reads the 2 B again.
    # Uncached layers pay it in forward and backward (a recomputed layer's backward reuses the
    # weights its recompute dequantized: fused_layer.held_weights).
    passes = 2 * (shape.layers - cached_layers)
    passes -= turn_layers(shape, cached_layers, tokens, recompute_layers, graphs, fused)  # forwards that find them
    dequant_s = passes * shape.linear_params_per_layer * _DEQUANT_BYTES / gpu.bandwidth
    # Elementwise work (norms, RoPE, SwiGLU, dropout, copies): passes over a layer's saved
    # activations per token, forward and backward.
    elem = tokens * shape.layers * activation_bytes_per_token_layer(shape, job.lora_dropout, fused) * _ELEMENTWISE_PASSES
    elem_s = elem * (1 + 0.4 * frac_recomputed) / gpu.bandwidth
    elem_s += tokens * shape.vocab * _CE_BYTES_PER_LOGIT / gpu.bandwidth  # the loss's softmax passes
    # the saved inputs out and back (_OFFLOAD_BYTES_PER_S), in the residual stream's dtype: fp32
    # where the layers keep it so (the fused architectures, RESIDUAL_BYTES), else the compute dtype
    stream_bytes = RESIDUAL_BYTES if shape.fusable else 2
    offload_s = (tokens * shape.layers * shape.hidden * stream_bytes * 2 / _OFFLOAD_BYTES_PER_S) if offload else 0.0
    fixed_s = shape.layers * _LAYER_FIXED_GPU_S * (1 + 0.5 * frac_recomputed)
    gpu_s = gemm_s + dequant_s + elem_s + fixed_s
    # The host issues ~300 kernels per layer per micro-step; small micro-steps are bound by it.
    layer_host_s = _LAYER_OVERHEAD_S if fused else _UNFUSED_LAYER_OVERHEAD_S
    host_s = (shape.layers * layer_host_s * (1 + 0.4 * frac_recomputed) + passes * _DEQUANT_OVERHEAD_S)
    if graphs:  # graphed layers cost the host one replay each (recompute included); offloaded ones run eagerly
        eager = recompute_layers if offload else 0
        host_s = eager * (_LAYER_OVERHEAD_S * 1.4 + 3 * _DEQUANT_OVERHEAD_S) + (shape.layers - eager) * _GRAPH_REPLAY_S
    host_s += math.ceil(tokens / chunk) * _CE_CHUNK_HOST_S
    # offload's copies block the host as well as the stream: nothing hides them (_OFFLOAD_BYTES_PER_S)
    micro_s = max(gpu_s, host_s) + offload_s + 0.1 * min(gpu_s, host_s)
    return accum * micro_s + _STEP_OVERHEAD_S


# ---------------------------------------------------------------------------------------------
# The plan


def _usable(gpu: GpuSpec) -> int:
    """Leave room for the CUDA context, cuBLAS workspaces and the allocator's slack."""
    return int(gpu.memory_bytes * 0.92 - 1.0 * GIB)


def _candidates(shape: ModelShape, job: JobShape, gpu: GpuSpec, ce_works: tuple = (CE_WORK_BYTES,),
                graphs: bool = False, fused: bool = True):
    """(micro-batch, recomputed layers, cached layers, offload, peak, seconds, parts, loss chunk)
    for every plan, each loss chunk size in `ce_works` (bytes of logits work) priced separately."""
    divisors = [b for b in range(1, job.effective_batch + 1) if job.effective_batch % b == 0]
    layer_steps = sorted(set([0, shape.layers] + list(range(0, shape.layers, max(1, shape.layers // 16)))))
    for b in divisors:
        chunks = sorted({choose_ce_chunk(shape, b * job.seq_len, w): w for w in ce_works}.items())
        for rec in layer_steps:
            for cached in layer_steps:
                for offload in ((False, True) if rec == shape.layers else (False,)):
                    for chunk, work in chunks:
                        peak, parts = plan_peak_bytes(shape, job, b, rec, cached, offload, work, graphs, fused)
                        secs = step_seconds(shape, job, gpu, b, rec, cached, offload, graphs, fused, chunk)
                        yield b, rec, cached, offload, peak, secs, parts, chunk


def _mode(shape: ModelShape, cand) -> str:
    _, rec, _, offload, *_ = cand
    return "offload" if offload else ("none" if rec == 0 else ("full" if rec == shape.layers else "selective"))


def _make_plan(shape, job, gpu, cand, budget, policy, packing, fused) -> MemoryPlan:
    b, rec, cached, offload, peak, secs, parts, chunk = cand
    mode = _mode(shape, cand)
    turn = turn_layers(shape, cached, b * job.seq_len, rec, graphs=not packing, fused=fused)
    return MemoryPlan(
        micro_batch=b,
        grad_accum=job.effective_batch // b,
        recompute=mode,
        recompute_layers=rec,
        cached_layers=cached,
        ce_chunk_tokens=chunk,
        packing=packing,
        predicted_peak_bytes=peak,
        predicted_tokens_per_s=job.effective_batch * job.seq_len / secs,
        budget_bytes=budget,
        policy=policy,
        optimizer=OPTIMIZER,
        breakdown={k: int(v) for k, v in parts.items()},
        fused_layers=fused,
        turn_layers=turn,
    )


def plan_memory(shape: ModelShape, job: JobShape, gpu: GpuSpec, policy: str = "auto",
                packing: bool = True, micro_batch: int | None = None, recompute: str | None = None,
                fused: bool = True) -> MemoryPlan:
    """The fastest plan that fits (see the module docstring for the policies: auto, lean, max).
    `micro_batch` pins the micro-batch (it must divide the effective batch) and `recompute` the
    recompute mode (one of RECOMPUTE_MODES); the rest is planned. `fused`: the decoder layers run
    as fused_layer.py's functions (CUDA graphs for fixed-length rows), else per projection; a LoRA
    rank above FUSED_MAX_RANK, or an architecture the fused layer does not take (shape.fusable), is
    planned per projection whatever it says (the layers will run so).

    Raises PlanDoesNotFit, naming the largest sequence length that would fit, when nothing fits.
    """
    if policy not in MEMORY_POLICIES:
        raise ValueError(f"unknown memory policy {policy!r}")
    if micro_batch is not None and (micro_batch < 1 or job.effective_batch % micro_batch):
        raise ValueError(f"micro-batch {micro_batch} does not divide the effective batch {job.effective_batch}")
    if recompute is not None and recompute not in RECOMPUTE_MODES:
        raise ValueError(f"unknown recompute mode {recompute!r}: one of {', '.join(RECOMPUTE_MODES)}")
    fused = fused and shape.fusable and job.lora_rank <= FUSED_MAX_RANK
    usable = _usable(gpu)
    baseline = baseline_peak_bytes(shape, job)
    if policy == "auto" and usable < 1.5 * baseline:
        policy = "lean"
    # 10% under the standard recipe: both numbers are estimates, and the promise is "never more".
    budget = usable if policy == "max" else (min(usable, int(0.9 * baseline)) if policy == "auto" else usable)
    ce_works = CE_WORK_CHOICES.get(policy, (CE_WORK_BYTES,))
    # Fixed-length rows replay the fused layers as CUDA graphs; packed rows (boundaries change
    # from batch to batch) run them eagerly (cuda_graphs.py).
    fitting = [c for c in _candidates(shape, job, gpu, ce_works, graphs=fused and not packing, fused=fused)
               if c[4] <= budget]
    if not fitting:
        raise PlanDoesNotFit(_does_not_fit_message(shape, job, gpu, usable))
    cands = [c for c in fitting if micro_batch in (None, c[0]) and recompute in (None, _mode(shape, c))]
    if not cands:
        smallest = min(fitting, key=lambda c: c[4])
        raise PlanDoesNotFit(f"no plan with micro-batch {micro_batch or 'any'} and recompute {recompute or 'any'} "
                             f"fits the {budget / GIB:.1f} GiB budget on {gpu.name}; unpinned, micro-batch "
                             f"{smallest[0]} with recompute {_mode(shape, smallest)} would")
    if policy == "lean":
        lean = _lean_choice(shape, job, cands, fused)
        return _make_plan(shape, job, gpu, lean, budget, "lean", packing, fused)
    best = min(c[5] for c in cands)
    near = [c for c in cands if c[5] <= best * 1.03]
    choice = min(near, key=lambda c: (c[4], c[5]))
    return _make_plan(shape, job, gpu, _with_weight_copies(choice, cands), budget, policy, packing, fused)


def _with_weight_copies(choice, cands):
    """The chosen micro-batch, recompute and loss chunk, with bf16 weight copies in as many layers
    as the budget still holds when that is faster. A copy saves only time (no dequantization in
    its layer's passes); the 3% rule above, which prefers the plan that needs least memory, would
    otherwise leave the budget unspent for a gain of 2-3% at 7B-8B. Copies within 0.1% of the
    fastest count as no faster, so no memory goes to them for nothing."""
    b, rec, _, offload, *_rest = choice
    same = [c for c in cands if (c[0], c[1], c[3], c[7]) == (b, rec, offload, choice[7])]
    fastest = min(c[5] for c in same)
    return min((c for c in same if c[5] <= fastest * 1.001), key=lambda c: (c[4], c[5]))


def lean_cap_bytes(shape: ModelShape, job: JobShape, micro_batch: int, fused: bool = True) -> int:
    """The most a lean plan at this micro-batch may need (_lean_choice): 1.3x the weights and
    optimizer, 0.25 GiB, and the fp32 half of the layer checkpoints (both paths) and the fused
    layers' kept LoRA A sides (both came after the rule was set: allowed on top, so the same jobs
    get the same micro-batch)."""
    base_cap = 1.3 * sum(static_bytes(shape, job.lora_rank, job.adapter_bytes).values()) + 0.25 * GIB
    per_token_layer = (RESIDUAL_BYTES - 2) * shape.hidden + (recompute_a_sides_bytes_per_token(job.lora_rank)
                                                              if fused else 0)
    return int(base_cap + per_token_layer * shape.layers * job.seq_len * micro_batch)


def _lean_choice(shape: ModelShape, job: JobShape, cands, fused: bool = True):
    """Lean: every layer recomputed, no weight copies, and the fastest micro-batch (and loss chunk,
    CE_WORK_CHOICES) whose peak stays within 1.3x the weights-and-optimizer footprint (activations
    get less than a third of what the model itself needs). The rule was set with a bf16 residual stream; the fused layers' fp32
    stream (kept for the plain recipe's numerics) doubles the layer checkpoints, and that second
    half is allowed on top, so the same jobs get the same micro-batch as before."""
    full = [c for c in cands if c[1] == shape.layers and c[2] == 0]
    if not full:
        return min(cands, key=lambda c: c[4])

    def cap(c):
        return lean_cap_bytes(shape, job, c[0], fused)

    within = [c for c in full if c[4] <= cap(c) and not c[3]] or [c for c in full if c[4] <= cap(c)]
    if not within:
        return min(full, key=lambda c: c[4])
    return min(within, key=lambda c: (c[5], c[4]))


def _does_not_fit_message(shape: ModelShape, job: JobShape, gpu: GpuSpec, usable: int) -> str:
    smallest, _ = plan_peak_bytes(shape, job, 1, shape.layers, 0, offload=True)
    lo, hi = 0, job.seq_len
    while lo < hi:  # the longest sequence that fits at micro-batch 1 with everything offloaded
        mid = (lo + hi + 1) // 2
        peak, _ = plan_peak_bytes(shape, replace(job, seq_len=mid, micro_batch=1, grad_accum=1), 1,
                                  shape.layers, 0, offload=True)
        lo, hi = (mid, hi) if peak <= usable else (lo, mid - 1)
    static = sum(static_bytes(shape, job.lora_rank, job.adapter_bytes).values())
    if lo < 16:
        hint = (f"even the weights and adapter alone need {static / GIB:.1f} GiB: use a GPU with at least "
                f"{math.ceil((static + GIB) / 0.92 / GIB + 1)} GiB, or a lower LoRA rank")
    else:
        hint = f"the largest setting that fits is maxSeqLength {lo // 8 * 8} at micro-batch 1 (offloaded recompute)"
    return (f"this job does not fit on {gpu.name} ({gpu.memory_bytes / GIB:.1f} GiB, {usable / GIB:.1f} GiB usable): "
            f"maxSeqLength {job.seq_len} at micro-batch 1 needs about {smallest / GIB:.1f} GiB even with every layer "
            f"recomputed and its inputs offloaded; {hint}")
