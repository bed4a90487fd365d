"""The decoder layer of Llama-style models (Llama, Qwen2, Mistral, ...) as two autograd functions,
for training with LoRA on every projection of a frozen (NF4 or bf16) base.

    y = x + o_proj(attention(rope(qkv_proj(rms_norm(x)))))        FusedAttentionBlock
    z = y + down_proj(silu(gate_proj(n)) * up_proj(n)), n = rms_norm(y)   FusedMLPBlock

Same numerics as the plain recipe, far fewer kernel launches and bytes moved:
- q, k and v run as one GEMM over their concatenated frozen weights, gate and up as another
  (dequantized straight into one buffer, or a cached bf16 copy of the concatenation);
- the LoRA A side of the projections that share an input is one kernel that applies each
  projection's dropout mask while it reads the input (fused_ops.lora_a): no mask is stored, backward
  draws it again from the same seed; the B side of q, k and v is one GEMM with a block-diagonal B;
- the residual add follows the o_proj and down_proj outputs with their LoRA products (one
  element-wise pass; riding on the GEMM, it rounded a young adapter's contribution away);
- RMSNorm, RoPE (in place on the qkv buffer) and SwiGLU are one kernel each (fused_ops);
- attention runs per record, called directly (attention.py: cuDNN's fused flash attention for
  fixed-length rows on Hopper, FlashAttention-2 varlen for packed records);
- the residual stream between the blocks and layers stays in fp32 when every layer of the model is
  fused (apply.py upcasts the embeddings' output), as in the plain recipe, whose
  prepare_model_for_kbit_training leaves embeddings and norms in fp32: the norms read fp32 and
  write the compute-dtype GEMM input, each adapter product joins its projection's output in fp32
  (q|k|v before RoPE, gate|up before SwiGLU, rounded once after them; o_proj/down_proj straight
  into the fp32 stream), and the fp32 gradient is cast once per block for the backward GEMMs. In
  bf16, a young adapter's products (a thousandth of the projections' outputs) survived only as
  rounding noise and the fused path learned measurably slower than the plain recipe at the
  Llama-3-8B shape (benchmarks/results/lora_grad_parity_h200.md, sections 3 and 7).
What is kept for backward: the layer input, the qkv buffer, the attention output and its
logsumexp, gate|up, and the small LoRA A-side activations. The norms' and SwiGLU's outputs, which
the LoRA A gradients read, are rebuilt bit for bit by their own backward kernels, over the
gradient each has just read (no pass of their own over x or gate|up, no memory of their own). A
layer the memory plan recomputes keeps only its input, its dropout seeds and its LoRA A-side
products (ASides: N x 7r values, ~0.5 MB per layer of a 2,048-token 8B micro-step), and runs its
forward again inside backward (so it can still be captured as a CUDA graph: cuda_graphs.py),
without the masked A-side kernels, whose products it already has.

Anything the functions do not cover (generation, eval, caches, disabled adapters, other
architectures) keeps the original forward.
"""

from __future__ import annotations

import torch

from . import attention
from . import fused_ops as ops
from .forward_patch import replace_forward
from .packing import _on_device
from .planner import FUSABLE_ARCHITECTURES, FUSED_MAX_RANK

# ---------------------------------------------------------------------------------------------
# Frozen weights of several projections as one matrix


class FusedWeight:
    """The compute-dtype weight [sum(out_j), in] of projections sharing an input: a cached copy, or
    each NF4 weight dequantized into its rows of one fresh buffer, or, inside a graphed layer's
    programs, of its region kept across the turn (turn_weights.py)."""

    def __init__(self, projs, dtype: torch.dtype):
        self.projs = projs  # kernels.Projection, each with .weight (FrozenWeight)
        self.dtype = dtype
        self.rows = [p.weight.shape[0] for p in projs]
        self.in_features = projs[0].weight.shape[1]
        self.cache: torch.Tensor | None = None
        # cuda_graphs.LayerGraphs sets both when the layer keeps its weights across the turn: the
        # region [sum(out_j), in] and the layer's flag (nonzero: the region holds the weights)
        self.turn: torch.Tensor | None = None
        self.turn_flag: torch.Tensor | None = None
        biases = [p.weight.bias for p in projs]
        if any(b is not None for b in biases):
            self.bias = torch.cat([b if b is not None else torch.zeros(r, dtype=dtype, device=self._device())
                                   for b, r in zip(biases, self.rows)]).to(dtype)
        else:
            self.bias = None

    def _device(self):
        return self.projs[0].weight.base.weight.device

    def __deepcopy__(self, memo):
        """A copy of the model gets no region: it belongs to the original's graphs (the copy's own
        graphs place the copy's weights when they are built)."""
        import copy

        fresh = FusedWeight.__new__(FusedWeight)
        memo[id(self)] = fresh
        for k, v in self.__dict__.items():
            setattr(fresh, k, None if k in ("turn", "turn_flag") else copy.deepcopy(v, memo))
        return fresh

    @property
    def dequantizes(self) -> bool:
        """Every pass dequantizes it: no copy is cached and every part is NF4."""
        return self.cache is None and all(p.weight.quantized and p.weight.cache is None for p in self.projs)

    def get(self) -> torch.Tensor:
        if self.cache is not None:
            return self.cache
        if self.turn is not None and _IN_GRAPH[0]:
            # a forward program leaves the region alone while the flag says the backward filled it
            skip = self.turn_flag if _IN_GRAPH[0] == "forward" else None
            start = 0
            for p, r in zip(self.projs, self.rows):
                p.weight.get_into(self.turn[start:start + r], skip=skip)
                start += r
            return self.turn
        if len(self.projs) == 1:
            return self.projs[0].weight.get()
        out = torch.empty(sum(self.rows), self.in_features, dtype=self.dtype, device=self._device())
        start = 0
        for p, r in zip(self.projs, self.rows):
            p.weight.get_into(out[start:start + r])
            start += r
        return out

    def keep_copy(self) -> int:
        """Cache the concatenated weight (same values as dequantizing every pass); bytes used."""
        for p in self.projs:
            p.weight.cache = None
        self.cache = self.get().detach().contiguous()
        return self.cache.numel() * self.cache.element_size()


class held_weights:
    """Dequantize these weights once and use that copy until the block ends: a recomputed layer's
    forward and its backward then share one dequantization instead of two (one layer's bf16
    weights live meanwhile)."""

    def __init__(self, *weights: FusedWeight):
        self.weights = [w for w in weights if w.cache is None]

    def __enter__(self):
        for w in self.weights:
            w.cache = w.get()
        return self

    def __exit__(self, *exc):
        for w in self.weights:
            w.cache = None
        return False


_IN_GRAPH = [None]  # "forward" or "backward" while cuda_graphs runs (captures or emulates) a layer's program


class graph_program:
    """While a graphed layer's program is captured or emulated, LoRASet.factors hands out the
    static factor buffers (which LayerGraphs refreshes once after each optimizer step), and a
    weight kept across the turn is read from (forward) or dequantized into (backward) its region."""

    def __init__(self, kind: str):
        if kind not in ("forward", "backward"):
            raise ValueError(f"graph_program: forward or backward, got {kind!r}")
        self.kind = kind

    def __enter__(self):
        _IN_GRAPH[0] = self.kind

    def __exit__(self, *exc):
        _IN_GRAPH[0] = None
        return False


def lora_sets(layer) -> list[LoRASet]:
    return [layer._qlora_qkv_lora, layer._qlora_o_lora, layer._qlora_gate_up_lora, layer._qlora_down_lora]


_OPTIMIZER_STEPS = [0, None]  # [steps any torch optimizer has taken in this process, the hook's handle]


def _count_optimizer_steps() -> int:
    """Optimizer steps so far. torch's fused AdamW writes the parameters without bumping their
    version counters, so versions alone cannot tell LoRASet that a step changed its factors."""
    if _OPTIMIZER_STEPS[1] is None:
        def counted(*_):
            _OPTIMIZER_STEPS[0] += 1

        from torch.optim.optimizer import register_optimizer_step_post_hook

        _OPTIMIZER_STEPS[1] = register_optimizer_step_post_hook(counted)
    return _OPTIMIZER_STEPS[0]


class LoRASet:
    """The LoRA factors of projections sharing an input, as the fused functions use them:
    A concatenated [n*r, in] in the compute dtype, and B with scaling (and the dropout's
    1/(1-p)) folded in, as a block-diagonal [sum(out_j), n*r]. Rebuilt only when a factor may have
    changed (an optimizer step anywhere in the process, or a tensor version: an in-place write
    such as a checkpoint load), not every micro-step."""

    def __init__(self, modules, dtype: torch.dtype):
        self.modules = modules
        self.dtype = dtype
        first = modules[0]
        self.p = float(first._qlora_proj.dropout)
        self.keep = 1.0 / (1.0 - self.p) if self.p > 0 else 1.0
        self.rank = first.lora_A[first._qlora_adapter].weight.shape[0]
        self._key = None
        self._A = self._B = None
        self.static: tuple[torch.Tensor, torch.Tensor] | None = None
        # A graphed layer's gradient sources (cuda_graphs.LayerGrads): inside its programs, gA is
        # written into sink[0] and the set's gB ([sum(out_j), r] fp32, lora_b_grads) into sink[1],
        # which one kernel per layer then adds, scaled, into the flat .grad buffer.
        self.sink: tuple[torch.Tensor, torch.Tensor] | None = None
        self.sink_owner = None  # the cuda_graphs.LayerGrads whose buffers the sink is part of
        _count_optimizer_steps()  # the hook is in place before the first step

    def params(self) -> list[torch.Tensor]:
        out = []
        for m in self.modules:
            out += [m.lora_A[m._qlora_adapter].weight, m.lora_B[m._qlora_adapter].weight]
        return out

    def scales(self) -> list[float]:
        return [m._qlora_proj.scaling * self.keep for m in self.modules]

    def factors(self, params) -> tuple[torch.Tensor, torch.Tensor]:
        if self.static is not None and _IN_GRAPH[0]:
            return self.static  # refreshed before the graphs replay (cuda_graphs.LayerGraphs.refresh)
        capturing = params[0].is_cuda and torch.cuda.is_current_stream_capturing()
        key = None if capturing else (_count_optimizer_steps(), *((t.data_ptr(), t._version) for t in params))
        if capturing or key != self._key:  # a CUDA graph must rebuild them from the live parameters
            self._A, self._B = self._build(params)
            self._key = key
        return self._A, self._B

    def _build(self, params) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            As, Bs = params[0::2], params[1::2]
            A = torch.cat([a.to(self.dtype) for a in As], 0).contiguous()
            if len(Bs) == 1:
                B = (Bs[0] * self.scales()[0]).to(self.dtype).contiguous()
            else:
                B = torch.block_diag(*[b * s for b, s in zip(Bs, self.scales())]).to(self.dtype)
        return A, B

    def make_static(self) -> None:
        """Static buffers that the graphed layers read instead of rebuilding the factors in every
        replay (~60 small kernels per layer per micro-step): `refresh_static` writes them, once
        after each change of the parameters."""
        self.static = tuple(t.clone() for t in self._build(self.params()))
        self.static_scales = torch.tensor(self.scales(), dtype=torch.float32, device=self.static[0].device)

    def refresh_static(self) -> None:
        """What _build computes, written straight into the static buffers (fused_ops.lora_factors_:
        A cast while it is concatenated, each scaled B rounded into its block of the block
        diagonal, the zeros around the blocks from make_static left alone; one kernel per set on a
        GPU). Building and copying took ~1,100 small kernels at 8B (casts, block_diag's fills and
        copies, two copies per set), once per optimizer step
        (benchmarks/results/speed_small_kernels_8b_session11_h200.md); writing in place ~450."""
        params = self.params()
        A, B = self.static
        with torch.no_grad():
            ops.lora_factors_(A, B, params[0::2], params[1::2], self.static_scales)

    def a_grad(self, ga: torch.Tensor, x: torch.Tensor, seed) -> torch.Tensor:
        """The set's gA (lora_a_backward): into the graphed layer's sink when there is one. When
        the layer's program has zeroed all its sources in one fill (LayerGrads.clear), the kernel
        sums into the sink without filling it again."""
        out = self.grad_a_out()
        return ops.lora_a_backward(ga, x, seed, self.p, len(self.modules), out=out,
                                   out_zeroed=self._sink_zeroed(out))

    def b_grads(self, g: torch.Tensor, a: torch.Tensor, B: torch.Tensor, rows: list[int]):
        """The set's ga and gB (lora_b_grads), gB into the graphed layer's sink as in a_grad."""
        out = self.grad_b_out()
        return ops.lora_b_grads(g, a, B, rows, out=out, out_zeroed=self._sink_zeroed(out))

    def _sink_zeroed(self, out) -> bool:
        return out is not None and self.sink_owner is not None and self.sink_owner.cleared

    def grad_a_out(self) -> torch.Tensor | None:
        """Where lora_a_backward writes gA: the graphed layer's source buffer, or None (fresh)."""
        return self.sink[0] if self.sink is not None and _IN_GRAPH[0] else None

    def grad_b_out(self) -> torch.Tensor | None:
        """Where lora_b_grads writes gB: the graphed layer's source buffer, or None (fresh)."""
        return self.sink[1] if self.sink is not None and _IN_GRAPH[0] else None

    def grads(self, gB: torch.Tensor, gA: torch.Tensor, rows: list[int], params) -> list[torch.Tensor]:
        """[gA_0, gB_0, gA_1, gB_1, ...] in the parameters' dtypes from the set's gA [n*r, in] and gB
        [sum(rows), r] (lora_b_grads' fp32 sums, scaled here). Inside a graphed layer's program
        with a sink: [] (both are already in the sink; LayerGrads.accumulate scales and adds them
        all in one kernel)."""
        r, start = self.rank, 0
        if self.sink is not None and _IN_GRAPH[0]:
            if gA.data_ptr() != self.sink[0].data_ptr() or gB.data_ptr() != self.sink[1].data_ptr():
                raise RuntimeError("LoRASet.grads: gA or gB was not written into the graphed layer's sink")
            return []
        out = []
        for j, (s, n_out) in enumerate(zip(self.scales(), rows)):
            gBj = gB[start:start + n_out].to(gA.dtype) * s
            out += [gA[j * r:(j + 1) * r].to(params[2 * j].dtype), gBj.to(params[2 * j + 1].dtype)]
            start += n_out
        return out


class AttentionShape:
    def __init__(self, heads: int, kv_heads: int, head_dim: int, scale: float, eps: float):
        self.heads, self.kv_heads, self.head_dim, self.scale, self.eps = heads, kv_heads, head_dim, scale, eps

    def split(self, qkv):
        """q, k, v as [N, heads, D] views of the qkv buffer (no copies)."""
        n = qkv.shape[0]
        heads = qkv.view(n, self.heads + 2 * self.kv_heads, self.head_dim)
        hq, hk = self.heads, self.kv_heads
        return heads[:, :hq], heads[:, hq:hq + hk], heads[:, hq + hk:], heads[:, :hq + hk]


def _project_and_add(x, inp, w, a, B, out=None):
    """x + (inp @ w.T + a @ B.T), in this order (into `out` when given). The adapter's product
    joins the projection's output before the residual stream: added to the residual sum after it was rounded to bf16, a young
    adapter's contribution (smaller than half a bf16 step of the residual stream) rounded away to
    exactly nothing, and the fused path learned measurably slower than the plain recipe at the
    Llama-3-8B shape (benchmarks/results/lora_grad_parity_h200.md). With an fp32 residual stream
    (x fp32) the sum is fp32, as the plain recipe's `residual + hidden_states`."""
    y = inp @ w.t()
    if x.dtype != y.dtype:  # fp32 stream: base and adapter products summed in fp32, as the plain recipe
        return ops.lora_residual_add(x, y, a, B, out=out)
    y.addmm_(a, B.t())
    return y.add_(x) if out is None else torch.add(y, x, out=out)


def _compute(g: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An fp32 residual stream's gradient, cast once for the compute-dtype GEMMs of a block's
    backward (the fp32 gradient itself goes on down the residual path)."""
    return g if g.dtype == dtype else g.to(dtype)


class ASides(tuple):
    """What a recomputing block keeps besides its input and seeds: its LoRA A-side products
    ((x * mask_j) @ A_j^T for each group of projections sharing an input). Its recompute takes
    them as they are instead of running lora_a again: the masked A side was a fifth of a
    recomputed layer's kernel time (benchmarks/NOTES.md, "Session 9 profile"), and they are the
    forward's very values, so the backward sees what a non-recomputing layer would."""


def _attention_forward(layer, x, norm_w, cos, sin, pack, seeds, lora_params, a_sides=None, into=None):
    """y = x + o_proj(attention(rope(qkv(rms_norm(x))))) and what backward needs; `a_sides`
    (ASides of the qkv and o_proj A sides): a recompute's, reused instead of drawn again; `into`:
    buffers for q|k|v and y ({"qkv": ..., "y": ...}, either left out: a fresh one)."""
    into = into or {}
    shape, W, Wo = layer._qlora_attn_shape, layer._qlora_qkv, layer._qlora_o
    qkv_lora, o_lora = layer._qlora_qkv_lora, layer._qlora_o_lora
    A, B = qkv_lora.factors(lora_params[:6])
    Ao, Bo = o_lora.factors(lora_params[6:])
    h, rstd = ops.rms_norm(x, norm_w, shape.eps, W.dtype)
    w = W.get()
    qkv = torch.addmm(W.bias, h, w.t(), out=into.get("qkv")) if W.bias is not None else \
        torch.mm(h, w.t(), out=into.get("qkv"))
    del w
    a = ops.lora_a(h, A, seeds[0], qkv_lora.p, 3) if a_sides is None else a_sides[0]
    del h
    if x.dtype == torch.float32 and qkv.dtype != torch.float32:
        # fp32 stream: the adapter product joins in fp32, RoPE in fp32, one rounding (one kernel).
        # The plain recipe adds each adapter product to its 4-bit layer's output in fp32: rounded
        # to bf16 together with a projection output of order one, a young adapter's product of
        # order 1e-3 survives only as rounding noise (issue 19).
        ops.lora_rope_(qkv, a, B, cos, sin, shape.heads + shape.kv_heads, shape.head_dim)
    else:
        qkv.addmm_(a, B.t())
        ops.rope_(shape.split(qkv)[3], cos, sin)
    q, k, v, qk = shape.split(qkv)
    out, state = attention.forward(q, k, v, pack[0], pack[1], shape.scale)
    o2 = out.view(out.shape[0], -1)
    ao = ops.lora_a(o2, Ao, seeds[1], o_lora.p, 1) if a_sides is None else a_sides[1]
    y = _project_and_add(x, o2, Wo.get(), ao, Bo, out=into.get("y"))
    return y, (rstd, qkv, out, state, a, ao)


class FusedAttentionBlock(torch.autograd.Function):
    """Keeps rstd, qkv, the attention output and logsumexp, and the LoRA A sides; or, for a layer
    that recomputes (layer._qlora_recompute), only x, the dropout seeds and the A sides, and runs
    the forward again in backward (inside the backward's CUDA graph, when the layer is graphed)."""

    @staticmethod
    def forward(ctx, x, norm_w, rope, pack, seeds, layer, *lora_params):
        y, saved = _attention_forward(layer, x, norm_w, *rope, pack, seeds, lora_params)
        ctx.layer, ctx.seeds, ctx.pack, ctx.rope = layer, seeds, pack, rope
        ctx.recompute = bool(getattr(layer, "_qlora_recompute", False))
        if ctx.recompute:
            ctx.save_for_backward(x, norm_w, *lora_params, *saved[4:])
        else:
            rstd, qkv, out, ctx.state, a, ao = saved
            ctx.save_for_backward(x, norm_w, *lora_params, rstd, qkv, out, a, ao)
        return y

    @staticmethod
    def backward(ctx, gy):
        x, norm_w, *rest = ctx.saved_tensors
        lora_params = rest[:8]
        saved = ASides(rest[8:]) if ctx.recompute else (*rest[8:11], ctx.state, *rest[11:])
        gx, grads = _attention_backward(ctx.layer, x, norm_w, ctx.rope, ctx.pack, ctx.seeds, lora_params, saved, gy)
        return (gx, None, None, None, None, None, *grads)


def _attention_backward(layer, x, norm_w, rope, pack, seeds, lora_params, saved, gy, gx_out=None, gyc=None,
                        gx_compute=None):
    """(gx, LoRA gradients in lora_params' order) of the attention block; `saved` is what
    _attention_forward returned, or None or ASides to run that forward again first; gx written into
    `gx_out` when given. `gyc`: gy in the compute dtype when the caller has it (else cast here);
    `gx_compute`: a buffer that gets gx in the compute dtype too (the next block's gyc)."""
    if saved is None or isinstance(saved, ASides):
        with held_weights(layer._qlora_qkv, layer._qlora_o):
            _, saved = _attention_forward(layer, x, norm_w, *rope, pack, seeds, lora_params, saved)
            return _attention_backward(layer, x, norm_w, rope, pack, seeds, lora_params, saved, gy, gx_out, gyc,
                                       gx_compute)
    cos, sin = rope
    cu, max_len = pack
    rstd, qkv, out, state, a, ao = saved
    shape, W, Wo = layer._qlora_attn_shape, layer._qlora_qkv, layer._qlora_o
    qkv_lora, o_lora = layer._qlora_qkv_lora, layer._qlora_o_lora
    A, B = qkv_lora.factors(lora_params[:6])
    Ao, Bo = o_lora.factors(lora_params[6:])
    gy = gy.contiguous()
    gyc = _compute(gy, Wo.dtype) if gyc is None else gyc
    o2 = out.view(out.shape[0], -1)
    # o_proj (+ residual): y = x + o2 Wo^T + ao Bo^T
    gao, gBo = o_lora.b_grads(gyc, ao, Bo, [gy.shape[1]])
    go = gyc @ Wo.get()
    ops.lora_x_backward_(go, gao, Ao, seeds[1], o_lora.p, 1)
    gAo = o_lora.a_grad(gao, o2, seeds[1])
    o_grads = o_lora.grads(gBo, gAo, [gy.shape[1]], lora_params[6:])
    del gyc
    # attention, then the q|k|v gradient buffer written once: RoPE backward on the q and k heads, v's
    # copied (dq, dk, dv come in each attention backend's own layout)
    q, k, v, _ = shape.split(qkv)
    dq, dk, dv = attention.backward(go.view_as(out), q, k, v, out, state, cu, max_len, shape.scale)
    gqkv = ops.rope_backward_cat(dq, dk, dv, cos, sin)
    # qkv projection: qkv = h W^T + b + a B^T
    ga, gB = qkv_lora.b_grads(gqkv, a, B, W.rows)
    gh = gqkv @ W.get()
    ops.lora_x_backward_(gh, ga, A, seeds[0], qkv_lora.p, 3)
    gx = ops.rms_norm_backward(gh, x, norm_w, rstd, residual=gy, out=gx_out, compute_out=gx_compute,
                               forward_into_gy=True)
    h = gh  # now the norm's output, the q|k|v input, as the forward made it
    gA = qkv_lora.a_grad(ga, h, seeds[0])
    del h, gh
    qkv_grads = qkv_lora.grads(gB, gA, W.rows, lora_params[:6])
    return gx, [*qkv_grads, *o_grads]


def _mlp_forward(layer, x, norm_w, seeds, lora_params, a_sides=None, out=None, gate_up_out=None):
    """z = x + down(silu(gate(n)) * up(n)), n = rms_norm(x), and what backward needs; `a_sides`
    (ASides of the gate|up and down_proj A sides): a recompute's, reused; z written into `out` and
    gate|up into `gate_up_out` when given."""
    Wgu, Wd = layer._qlora_gate_up, layer._qlora_down
    gu_lora, d_lora = layer._qlora_gate_up_lora, layer._qlora_down_lora
    A, B = gu_lora.factors(lora_params[:4])
    Ad, Bd = d_lora.factors(lora_params[4:])
    h, rstd = ops.rms_norm(x, norm_w, layer._qlora_attn_shape.eps, Wgu.dtype)
    gu = torch.mm(h, Wgu.get().t(), out=gate_up_out)
    a = ops.lora_a(h, A, seeds[0], gu_lora.p, 2) if a_sides is None else a_sides[0]
    del h
    if x.dtype == torch.float32 and gu.dtype != torch.float32:
        # fp32 stream: SwiGLU of the fp32 sums, gate|up rounded once in place (what backward keeps)
        m = ops.lora_swiglu_(gu, a, B)
    else:
        gu.addmm_(a, B.t())
        m = ops.swiglu(gu, Wgu.dtype)
    ad = ops.lora_a(m, Ad, seeds[1], d_lora.p, 1) if a_sides is None else a_sides[1]
    y = _project_and_add(x, m, Wd.get(), ad, Bd, out)
    del m
    return y, (rstd, gu, a, ad)


class FusedMLPBlock(torch.autograd.Function):
    """Keeps rstd, gate|up and the LoRA A sides, or (recompute) only x, the seeds and the A sides."""

    @staticmethod
    def forward(ctx, x, norm_w, seeds, layer, *lora_params):
        y, saved = _mlp_forward(layer, x, norm_w, seeds, lora_params)
        ctx.layer, ctx.seeds = layer, seeds
        ctx.recompute = bool(getattr(layer, "_qlora_recompute", False))
        ctx.save_for_backward(x, norm_w, *lora_params, *(saved[2:] if ctx.recompute else saved))
        return y

    @staticmethod
    def backward(ctx, gy):
        x, norm_w, *rest = ctx.saved_tensors
        lora_params = rest[:6]
        saved = ASides(rest[6:]) if ctx.recompute else tuple(rest[6:])
        gx, grads = _mlp_backward(ctx.layer, x, norm_w, ctx.seeds, lora_params, saved, gy)
        return (gx, None, None, None, *grads)


def _mlp_backward(layer, x, norm_w, seeds, lora_params, saved, gy, gyc=None, gx_compute=None):
    """(gx, LoRA gradients) of the MLP block; `saved` from _mlp_forward, or None or ASides to
    recompute; `gyc` and `gx_compute` as in _attention_backward."""
    if saved is None or isinstance(saved, ASides):
        with held_weights(layer._qlora_gate_up, layer._qlora_down):
            _, saved = _mlp_forward(layer, x, norm_w, seeds, lora_params, saved)
            return _mlp_backward(layer, x, norm_w, seeds, lora_params, saved, gy, gyc, gx_compute)
    rstd, gu, a, ad = saved
    Wgu, Wd = layer._qlora_gate_up, layer._qlora_down
    gu_lora, d_lora = layer._qlora_gate_up_lora, layer._qlora_down_lora
    A, B = gu_lora.factors(lora_params[:4])
    Ad, Bd = d_lora.factors(lora_params[4:])
    gy = gy.contiguous()
    gyc = _compute(gy, Wd.dtype) if gyc is None else gyc
    gad, gBd = d_lora.b_grads(gyc, ad, Bd, [gy.shape[1]])
    gm = gyc @ Wd.get()
    del gyc
    ops.lora_x_backward_(gm, gad, Ad, seeds[1], d_lora.p, 1)
    ggu = ops.swiglu_backward(gm, gu, forward_into_gh=True)
    m = gm  # now SwiGLU's output, the down_proj input, as the forward made it
    gAd = d_lora.a_grad(gad, m, seeds[1])
    del m, gm
    d_grads = d_lora.grads(gBd, gAd, [gy.shape[1]], lora_params[4:])
    ga, gB = gu_lora.b_grads(ggu, a, B, Wgu.rows)
    gh = ggu @ Wgu.get()
    del ggu
    ops.lora_x_backward_(gh, ga, A, seeds[0], gu_lora.p, 2)
    gx = ops.rms_norm_backward(gh, x, norm_w, rstd, residual=gy, compute_out=gx_compute, forward_into_gy=True)
    h = gh  # now the norm's output, the gate|up input
    gA = gu_lora.a_grad(ga, h, seeds[0])
    del h, gh
    gu_grads = gu_lora.grads(gB, gA, Wgu.rows, lora_params[:4])
    return gx, [*gu_grads, *d_grads]


# ---------------------------------------------------------------------------------------------
# Installing it on a decoder layer

_NORM_CLASSES = {f"{prefix}RMSNorm" for prefix in FUSABLE_ARCHITECTURES.values()}  # what the planner plans fused


def _adapters_live(modules) -> bool:
    return all(not m.disable_adapters and not m.merged and list(m.active_adapters) == [m._qlora_adapter]
               for m in modules)


def fusable(layer) -> str | None:
    """Why this decoder layer cannot take the fused path, or None if it can."""
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    if attn is None or mlp is None:
        return "no self_attn/mlp"
    for norm in (getattr(layer, "input_layernorm", None), getattr(layer, "post_attention_layernorm", None)):
        if norm is None or type(norm).__name__ not in _NORM_CLASSES or not hasattr(norm, "variance_epsilon"):
            return "norms are not Llama-style RMSNorms"
    names = [(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")] + \
            [(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")]
    mods = [getattr(o, n, None) for o, n in names]
    if not all(m is not None and hasattr(m, "_qlora_proj") for m in mods):
        return "not every projection carries a plain LoRA adapter"
    if len({m._qlora_proj.dropout for m in mods}) != 1 or len({m.lora_A[m._qlora_adapter].weight.shape[0] for m in mods}) != 1:
        return "projections differ in LoRA rank or dropout"
    rank = mods[0].lora_A[mods[0]._qlora_adapter].weight.shape[0]
    if rank > FUSED_MAX_RANK:
        return f"LoRA rank {rank} is above the fused layer's largest, {FUSED_MAX_RANK}"
    if getattr(attn, "sliding_window", None) or getattr(attn, "q_norm", None) is not None:
        return "sliding-window or q/k-normed attention"
    act = getattr(mlp, "act_fn", None)
    if not isinstance(act, torch.nn.SiLU) and type(act).__name__ not in ("SiLU", "SiLUActivation"):
        return "MLP activation is not SiLU"
    if mods[3]._qlora_proj.weight.bias is not None or any(m._qlora_proj.weight.bias is not None for m in mods[4:]):
        return "biased o_proj or MLP projections"
    return None


def install(layer, config, dtype: torch.dtype) -> bool:
    """Give a decoder layer the fused training forward; False (layer untouched) if it cannot."""
    if fusable(layer) is not None:
        return False
    attn, mlp = layer.self_attn, layer.mlp
    heads = config.num_attention_heads
    head_dim = getattr(attn, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    layer._qlora_attn_shape = AttentionShape(heads, kv_heads, head_dim, float(attn.scaling),
                                             float(layer.input_layernorm.variance_epsilon))
    qkv = [attn.q_proj, attn.k_proj, attn.v_proj]
    gate_up = [mlp.gate_proj, mlp.up_proj]
    layer._qlora_qkv = FusedWeight([m._qlora_proj for m in qkv], dtype)
    layer._qlora_o = FusedWeight([attn.o_proj._qlora_proj], dtype)
    layer._qlora_gate_up = FusedWeight([m._qlora_proj for m in gate_up], dtype)
    layer._qlora_down = FusedWeight([mlp.down_proj._qlora_proj], dtype)
    layer._qlora_qkv_lora = LoRASet(qkv, dtype)
    layer._qlora_o_lora = LoRASet([attn.o_proj], dtype)
    layer._qlora_gate_up_lora = LoRASet(gate_up, dtype)
    layer._qlora_down_lora = LoRASet([mlp.down_proj], dtype)
    layer._qlora_all_lora = qkv + [attn.o_proj] + gate_up + [mlp.down_proj]
    layer._qlora_residual = dtype  # apply._keep_residual_fp32 makes it fp32 when every layer takes fp32

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None,
                use_cache=False, position_embeddings=None, **kwargs):
        if (not self.training or not torch.is_grad_enabled() or past_key_values is not None
                or position_embeddings is None or not _adapters_live(self._qlora_all_lora)
                or self.input_layernorm.weight.requires_grad or self.post_attention_layernorm.weight.requires_grad):
            return self._qlora_original_forward(
                hidden_states, attention_mask=attention_mask, position_ids=position_ids,
                past_key_values=past_key_values, use_cache=use_cache, position_embeddings=position_embeddings,
                **kwargs)
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        if x.dtype != self._qlora_residual:
            x = x.to(self._qlora_residual)
        cos, sin = _token_rope(position_embeddings, x.shape[0], shape[0])
        pack = packed_records(kwargs, position_ids, shape[0], shape[1], x.device)
        graphs = getattr(self, "_qlora_graphs", None)
        seeds = graphs.draw_seeds(self, x.device) if graphs is not None else None
        if graphs is not None and pack[0] is _ROWS.get((shape[0], shape[1], str(x.device))):
            z = graphs(self, x, cos, sin, pack)  # fixed-length rows: static boundaries, graphs apply
            if z is not None:
                return z.view(shape)
        return run_fused_layer(self, x, cos, sin, pack, seeds).view(shape)

    replace_forward(layer, forward)
    return True


def run_fused_layer(layer, x, cos, sin, pack, seeds=None):
    """One training forward of an installed layer: x [N, H] -> [N, H]. `seeds` [4] on the device:
    the two blocks' dropout seeds (cuda_graphs.LayerGraphs.draw_seeds: every fused layer's, drawn
    in one kernel per micro-step, the same draws whether the layer then runs graphed or eagerly);
    drawn here when not given."""
    if seeds is None:
        seeds = torch.randint(1, 2**30, (4,), device=x.device)  # on the device: no sync
    y = FusedAttentionBlock.apply(x, layer.input_layernorm.weight, (cos, sin), pack, seeds[:2], layer,
                                  *layer._qlora_qkv_lora.params(), *layer._qlora_o_lora.params())
    return FusedMLPBlock.apply(y, layer.post_attention_layernorm.weight, seeds[2:], layer,
                               *layer._qlora_gate_up_lora.params(), *layer._qlora_down_lora.params())


def layer_lora_params(layer) -> list[torch.Tensor]:
    """The layer's 14 LoRA factors in the order the fused functions take them."""
    return [*layer._qlora_qkv_lora.params(), *layer._qlora_o_lora.params(),
            *layer._qlora_gate_up_lora.params(), *layer._qlora_down_lora.params()]


def layer_forward(layer, x, cos, sin, pack, seeds, keep: bool, a_sides: ASides | None = None, out=None,
                  into: dict | None = None):
    """One installed layer without autograd (what cuda_graphs.py captures): z, and what
    layer_backward needs (when `keep` is False only the four A sides, ASides: backward runs this
    forward again with them, `a_sides`). `seeds` [4] on the device: the attention block's two
    dropout seeds, then the MLP block's. z is written into `out` when given (a graphed layer's
    output buffer, which is the next layer's input: no copy of the residual stream per layer), and
    the saved q|k|v, y and gate|up into `into`'s "qkv", "y" and "gate_up" where it has them (a
    graphed layer's places in the turn's arena: turn_weights.py)."""
    params = layer_lora_params(layer)
    into = into or {}
    attn_a, mlp_a = (None, None) if a_sides is None else (ASides(a_sides[:2]), ASides(a_sides[2:]))
    y, attn = _attention_forward(layer, x, layer.input_layernorm.weight, cos, sin, pack, seeds[:2], params[:8],
                                 attn_a, into)
    z, mlp = _mlp_forward(layer, y, layer.post_attention_layernorm.weight, seeds[2:], params[8:], mlp_a, out,
                          into.get("gate_up"))
    return z, ((y, attn, mlp) if keep else ASides((*attn[4:], *mlp[2:])))


def layer_backward(layer, x, cos, sin, pack, seeds, saved, gz, out=None, gzc=None, out_c=None):
    """(gx, the 14 LoRA gradients) of layer_forward (none inside a graphed layer's program whose LoRA
    sets have sinks: cuda_graphs.LayerGrads adds them); `saved` None or ASides recomputes the layer
    first (reusing the A sides it holds); gx written into `out` when given (a graphed layer's
    gradient buffer: no copy per layer). An fp32 stream's gradient is needed in the compute dtype
    by each block's GEMMs: each block's norm backward writes that copy too (the next block's,
    `out_c` for the layer below), and `gzc` is gz's, so no block casts its own (2 casts of 32 MB
    per layer per micro-step at 8B)."""
    params = layer_lora_params(layer)
    if saved is None or isinstance(saved, ASides):
        with held_weights(layer._qlora_qkv, layer._qlora_o, layer._qlora_gate_up, layer._qlora_down):
            _, saved = layer_forward(layer, x, cos, sin, pack, seeds, keep=True, a_sides=saved)
            return layer_backward(layer, x, cos, sin, pack, seeds, saved, gz, out, gzc, out_c)
    y, attn, mlp = saved
    compute = layer._qlora_o.dtype
    gyc = torch.empty(gz.shape, dtype=compute, device=gz.device) if gz.dtype != compute else None
    gy, mlp_grads = _mlp_backward(layer, y, layer.post_attention_layernorm.weight, seeds[2:], params[8:], mlp, gz,
                                  gzc, gyc)
    gx, attn_grads = _attention_backward(layer, x, layer.input_layernorm.weight, (cos, sin), pack, seeds[:2],
                                         params[:8], attn, gy, out, gyc, out_c)
    return gx, attn_grads + mlp_grads


_ROPE: list = []  # [(cos, sin, result)]: one per forward, shared by every layer


def _token_rope(position_embeddings, n_tokens: int, rows: int):
    """cos, sin as [N, D] per token (HF gives [B or 1, S, D]); computed once per forward."""
    cos, sin = position_embeddings
    for c, s, result in _ROPE:
        if c is cos and s is sin:
            return result
    c2, s2 = (t.reshape(-1, t.shape[-1]) for t in (cos, sin))
    if c2.shape[0] != n_tokens:  # one set of positions for every row
        c2, s2 = c2.repeat(rows, 1), s2.repeat(rows, 1)
    _ROPE[:] = [(cos, sin, (c2, s2))]
    return c2, s2


def install_graphs(layers, enabled: bool = True) -> int:
    """Share one LayerGraphs among a model's installed layers; how many layers may be graphed
    (none when the plan has CUDA graphs off)."""
    from .cuda_graphs import LayerGraphs

    fused = [layer for layer in layers if hasattr(layer, "_qlora_qkv")]
    graphs = LayerGraphs(fused, enabled=enabled)
    for layer in fused:
        layer._qlora_graphs = graphs
    on_cuda = bool(fused) and fused[0].input_layernorm.weight.is_cuda
    return len(graphs._eligible()) if on_cuda and not graphs.failed else 0


def keep_weight_copies(layer) -> int:
    """Cache the layer's concatenated bf16 weights; bytes used."""
    return sum(w.keep_copy() for w in (layer._qlora_qkv, layer._qlora_o, layer._qlora_gate_up, layer._qlora_down)
               if w.cache is None)


def packed_records(kwargs: dict, position_ids, bsz: int, seq: int, device) -> tuple[torch.Tensor, int]:
    """(cumulative record lengths on the device, longest record) for this forward."""
    from .packing import _cu_for

    cu = kwargs.get("cu_seq_lens_q")
    if cu is not None:
        max_len = int(kwargs.get("max_length_q") or seq)
    elif position_ids is None:  # every row one record: the same tensor for every layer and step
        return rows_pack(bsz, seq, device)
    else:
        cu, max_len = _cu_for(position_ids, bsz, seq)
    return _on_device(cu, device), max_len


_ROWS: dict = {}


def rows_pack(bsz: int, seq: int, device) -> tuple[torch.Tensor, int]:
    """Record boundaries of fixed-length rows (every row one record): one static device tensor per
    shape, which is what lets the layers run as CUDA graphs."""
    key = (bsz, seq, str(device))
    if key not in _ROWS:
        _ROWS[key] = torch.arange(0, (bsz + 1) * seq, seq, dtype=torch.int32, device=device)
    return _ROWS[key], seq


