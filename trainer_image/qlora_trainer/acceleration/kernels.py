"""Autograd functions of the fast path: LoRA over a frozen (NF4) linear, the gated MLP as one
function, a memory-lean RMSNorm, and cross-entropy that never builds the full-vocabulary logits.

Numerics follow the plain recipe op for op: the base matmul is F.linear(x, dequantize_4bit(W)) as
in bitsandbytes' training path, the LoRA branch is lora_B(lora_A(dropout(x))) * scaling in the
compute dtype (what autocast does to peft's fp32 adapters), each projection's output (the two
products summed), SiLU and the product in the input's dtype (fp32 on the recipe's fp32 residual
stream: bitsandbytes returns its input's dtype), RMSNorm in fp32, the loss from compute-dtype
logits upcast to fp32. What changes is what is
kept for backward (inputs and 1-byte dropout masks instead of every intermediate), how often the
frozen weights are dequantized (never, where a bf16 copy is cached), and the logits (a chunk at a
time).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import fused_ops as ops

_FAST_NF4: list = [None]  # None: not checked yet; then whether triton_ops.dequantize_nf4 is used


def _dequantize_into(w: torch.Tensor, qs, out: torch.Tensor, skip: torch.Tensor | None = None) -> None:
    """bitsandbytes' NF4 dequantization of w into out: one Triton launch on a GPU (bitsandbytes
    takes two, the nested absmax first, and reaches about half the card's bandwidth), checked bit
    for bit against bitsandbytes on its first use in the process (falls back to it otherwise).
    `skip` (a device flag, turn_weights.py): the Triton kernel leaves `out` alone while it reads
    nonzero; bitsandbytes' has no such flag and writes the same values again."""
    import bitsandbytes.functional as bnbf

    if _FAST_NF4[0] is None and not torch.cuda.is_current_stream_capturing():
        from . import fused_ops

        tri = fused_ops._triton_ops()
        ok = False
        if tri is not None and qs.quant_type == "nf4":
            try:
                tri.dequantize_nf4(w, qs, out)
                ok = torch.equal(out, bnbf.dequantize_4bit(w, qs).to(out.dtype))
            except Exception:  # noqa: BLE001  (an unexpected state layout: bitsandbytes does it)
                ok = False
        _FAST_NF4[0] = ok
        if not ok:
            import logging

            logging.getLogger(__name__).warning("NF4 dequantization through bitsandbytes (the Triton kernel "
                                                "does not reproduce it here)")
    if _FAST_NF4[0] and qs.quant_type == "nf4":
        from . import fused_ops

        fused_ops._triton_ops().dequantize_nf4(w, qs, out, skip=skip)
        return
    bnbf.dequantize_4bit(w, qs, out=out)


class FrozenWeight:
    """The compute-dtype weight of a frozen base linear: a cached copy, or a fresh dequantization."""

    def __init__(self, base_layer: torch.nn.Module, dtype: torch.dtype):
        self.base = base_layer
        self.dtype = dtype
        self.cache: torch.Tensor | None = None

    @property
    def bias(self) -> torch.Tensor | None:
        b = getattr(self.base, "bias", None)
        return None if b is None else b.to(self.dtype)

    @property
    def shape(self) -> tuple[int, int]:
        qs = getattr(self.base.weight, "quant_state", None)
        return tuple(qs.shape) if qs is not None else tuple(self.base.weight.shape)

    def get(self) -> torch.Tensor:
        if self.cache is not None:
            return self.cache
        w = self.base.weight
        qs = getattr(w, "quant_state", None)
        if qs is not None:
            if w.is_cuda and qs.dtype == self.dtype:
                out = torch.empty(qs.shape, dtype=self.dtype, device=w.device)
                _dequantize_into(w.data, qs, out)
                return out
            import bitsandbytes.functional as bnbf

            return bnbf.dequantize_4bit(w.data, qs).to(self.dtype)
        return w.detach().to(self.dtype)

    @property
    def quantized(self) -> bool:
        return getattr(self.base.weight, "quant_state", None) is not None

    def get_into(self, out: torch.Tensor, skip: torch.Tensor | None = None) -> None:
        """Write the compute-dtype weight into `out` (rows of a fused weight buffer); not while the
        one-element flag `skip` is nonzero (`out` still holds it: turn_weights.py), a test the
        GPU kernel makes as it runs (inside a CUDA graph) and the host makes elsewhere."""
        if skip is not None and not out.is_cuda:
            if int(skip.reshape(-1)[0]) != 0:
                return
            skip = None
        if self.cache is not None:
            out.copy_(self.cache)
            return
        w = self.base.weight
        qs = getattr(w, "quant_state", None)
        if qs is not None and qs.dtype == out.dtype and out.is_cuda:  # bitsandbytes has no CPU `out=` kernel
            _dequantize_into(w.data, qs, out, skip)
            return
        out.copy_(self.get())

    def keep_copy(self) -> int:
        """Cache the dequantized weight (same values bitsandbytes computes every pass); bytes used."""
        self.cache = self.get().detach().contiguous()
        return self.cache.numel() * self.cache.element_size()


class Projection:
    """One LoRA-wrapped linear as the functions below see it (non-tensor parts)."""

    def __init__(self, weight: FrozenWeight, scaling: float, dropout: float):
        self.weight, self.scaling, self.dropout = weight, float(scaling), float(dropout)


def _lora_forward(x2, proj: Projection, A, B, training: bool, out_dtype: torch.dtype | None = None):
    """y = x W^T + b + s * (drop(x) A^T) B^T. Returns y, the dropout mask (or None) and
    drop(x) A^T. The scalings ride on the small LoRA matrices. In the compute dtype the LoRA product
    is accumulated into the base output by the GEMM itself (addmm), so the branch costs no
    full-width passes beyond the dropout mask. `out_dtype` wider than the compute dtype (the input
    came from an fp32 residual stream's norm, or from an fp32 SwiGLU): the output is in that dtype,
    the base and LoRA products each rounded to the compute dtype and summed there, as the plain
    recipe's are (bitsandbytes returns a projection's output in its input's dtype and peft adds the
    LoRA product to it); summed in bf16, a young adapter's product, far below a bf16 step of the
    projection's output, rounded away and the path learned slower than the recipe at 8B."""
    y = F.linear(x2, proj.weight.get(), proj.weight.bias)
    mask = None
    if training and proj.dropout > 0:
        mask = torch.empty_like(x2, dtype=torch.bool).bernoulli_(1.0 - proj.dropout)
        a = F.linear(x2 * mask, (A * (1.0 / (1.0 - proj.dropout))).to(x2.dtype))
    else:
        a = F.linear(x2, A.to(x2.dtype))
    Bs = (B * proj.scaling).to(x2.dtype)
    if out_dtype is None or out_dtype == y.dtype:
        y.addmm_(a, Bs.t())
    else:
        y = y.to(out_dtype).add_(a @ Bs.t())
    return y, mask, a


def _wider(dtype: torch.dtype, compute: torch.dtype) -> torch.dtype | None:
    """`dtype` when it is wider than the compute dtype (an fp32 stream's tensor on a bf16 model)."""
    return dtype if dtype.is_floating_point and dtype.itemsize > compute.itemsize else None


def _lora_backward(gy, x2, mask, a, proj: Projection, A, B, need_input_grad: bool,
                   gx_dtype: torch.dtype | None = None):
    """Gradients of _lora_forward: input (base + LoRA branch), A and B. gy in the compute dtype.
    `gx_dtype` wider than it: the base and LoRA parts of the input gradient are each rounded to the
    compute dtype and summed in gx_dtype, as autograd sums the recipe's (its fp32 input feeds both)."""
    keep = 1.0 / (1.0 - proj.dropout) if mask is not None else 1.0
    Bs = (B * proj.scaling).to(gy.dtype)
    gB = (gy.t() @ a) * proj.scaling
    ga = gy @ Bs
    xd = x2 if mask is None else x2 * mask
    gA = (ga.t() @ xd) * keep
    gx = None
    if need_input_grad:
        gx = gy @ proj.weight.get()
        As = (A * keep).to(gy.dtype)
        if gx_dtype is not None and gx_dtype != gx.dtype:
            lora = ga @ As
            gx = gx.to(gx_dtype).add_(lora if mask is None else lora.mul_(mask))
        elif mask is None:
            gx.addmm_(ga, As)
        else:
            gx.addcmul_(ga @ As, mask)
    return gx, gA.to(A.dtype), gB.to(B.dtype)


class LoRALinearFunction(torch.autograd.Function):
    """One LoRA projection. Its output is in its input's dtype, as bitsandbytes' Linear4bit returns
    it: an input wider than the compute dtype (an fp32 residual stream's norm output, shared by q,
    k and v) is cast inside for the GEMMs, kept as it came (one tensor for the three, not a
    compute-dtype copy each), and the projection's output and the input's gradient come back in
    that dtype (_lora_forward, _lora_backward): the LoRA product joins the output, and the three
    projections' input gradients meet, in fp32 as in the plain recipe."""

    @staticmethod
    def forward(ctx, x, A, B, proj: Projection, training: bool):
        x2 = x.reshape(-1, x.shape[-1])
        y, mask, a = _lora_forward(x2.to(proj.weight.dtype), proj, A, B, training,
                                   _wider(x2.dtype, proj.weight.dtype))
        ctx.proj, ctx.in_shape = proj, x.shape
        ctx.save_for_backward(x2, mask, a, A, B)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, gy):
        x2, mask, a, A, B = ctx.saved_tensors
        compute = ctx.proj.weight.dtype
        gx, gA, gB = _lora_backward(gy.reshape(-1, gy.shape[-1]).to(compute), x2.to(compute), mask, a, ctx.proj,
                                    A, B, ctx.needs_input_grad[0], _wider(x2.dtype, compute))
        return (None if gx is None else gx.to(x2.dtype).view(ctx.in_shape)), gA, gB, None, None


class LoRAGatedMLPFunction(torch.autograd.Function):
    """down(silu(gate(x)) * up(x)), every projection with LoRA; keeps x, gate and up for backward
    and recomputes silu and the product (cheap elementwise) instead of keeping them. On a wider
    input (an fp32 stream's norm output) it runs as the plain recipe's MLP does: gate and up come
    out in that dtype with their LoRA products (LoRALinearFunction), SiLU and the product run
    there, down_proj casts its input for the GEMMs and returns that dtype; the gradients meet there."""

    @staticmethod
    def forward(ctx, x, Ag, Bg, Au, Bu, Ad, Bd, projs, training: bool):
        pg, pu, pd = projs
        x2 = x.reshape(-1, x.shape[-1])
        compute = pg.weight.dtype
        wide = _wider(x2.dtype, compute)
        xc = x2.to(compute)
        g, mg, ag = _lora_forward(xc, pg, Ag, Bg, training, wide)
        s = F.silu(g)
        u, mu, au = _lora_forward(xc, pu, Au, Bu, training, wide)
        h = (s * u).to(compute)
        del s
        y, md, ad = _lora_forward(h, pd, Ad, Bd, training, wide)
        del h
        ctx.projs, ctx.in_shape = projs, x.shape
        ctx.save_for_backward(x2, g, u, mg, mu, md, ag, au, ad, Ag, Bg, Au, Bu, Ad, Bd)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, gy):
        x2, g, u, mg, mu, md, ag, au, ad, Ag, Bg, Au, Bu, Ad, Bd = ctx.saved_tensors
        pg, pu, pd = ctx.projs
        compute = pg.weight.dtype
        wide = _wider(x2.dtype, compute)
        gy2 = gy.reshape(-1, gy.shape[-1]).to(compute)
        s = F.silu(g)
        h = (s * u).to(compute)
        gh, gAd, gBd = _lora_backward(gy2, h, md, ad, pd, Ad, Bd, True, wide)
        del h
        gu = gh * s
        gs = gh * u
        del gh, s
        gg = torch.ops.aten.silu_backward(gs, g)
        del gs
        need_x = ctx.needs_input_grad[0]
        xc = x2.to(compute)
        gxg, gAg, gBg = _lora_backward(gg.to(compute), xc, mg, ag, pg, Ag, Bg, need_x, wide)
        del gg
        gxu, gAu, gBu = _lora_backward(gu.to(compute), xc, mu, au, pu, Au, Bu, need_x, wide)
        gx = None if not need_x else (gxg.to(x2.dtype) + gxu.to(x2.dtype)).view(ctx.in_shape)
        return gx, gAg, gBg, gAu, gBu, gAd, gBd, None, None


class RMSNormFunction(torch.autograd.Function):
    """weight * (x * rsqrt(mean(x^2) + eps)) in fp32, cast back, as transformers' Llama/Qwen2
    RMSNorm; keeps its input and one fp32 scale per token instead of fp32 copies. On an fp32
    residual stream the input and the output are fp32, as the plain recipe's norms (upcast by
    prepare_model_for_kbit_training) give them."""

    @staticmethod
    def forward(ctx, x, weight, eps: float):
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        y = weight * (xf * rstd).to(x.dtype)
        ctx.save_for_backward(x, rstd, weight)
        return y

    @staticmethod
    def backward(ctx, gy):
        x, rstd, weight = ctx.saved_tensors
        xhat = x.to(rstd.dtype) * rstd
        gn = (gy * weight).to(rstd.dtype)
        gx = rstd * (gn - xhat * (gn * xhat).mean(-1, keepdim=True))
        gw = None
        if ctx.needs_input_grad[1]:
            gw = (gy * xhat.to(x.dtype)).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        return gx.to(x.dtype), gw, None


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum over valid tokens of CE(hidden @ W^T, label) / denominator, a chunk of tokens at a time.

    The gradient with respect to `hidden` is computed chunk by chunk in the forward pass (the LM
    head is frozen, so that is all backward needs) and scaled in backward: the peak is one chunk of
    logits, not all of them.
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, denominator: float | torch.Tensor, chunk: int):
        n = hidden.shape[0]
        w = weight.to(hidden.dtype)
        acc = torch.promote_types(hidden.dtype, torch.float32)  # fp32 for bf16, as transformers' loss
        total = torch.zeros((), dtype=acc, device=hidden.device)
        grad = torch.empty_like(hidden) if hidden.requires_grad else None
        # a tensor denominator (the Trainer's token count, on the GPU) stays there: reading it
        # would make the host wait for the GPU at every micro-step
        inv = torch.reciprocal(denominator) if isinstance(denominator, torch.Tensor) else 1.0 / float(denominator)
        for start in range(0, n, chunk):
            logits = F.linear(hidden[start:start + chunk], w)
            # the per-row losses, and (when a gradient is needed) the gradient over the logits
            total += ops.cross_entropy_rows_(logits, labels[start:start + chunk],
                                             inv if grad is not None else None).sum()
            if grad is not None:
                grad[start:start + chunk] = logits @ w
            del logits
        ctx.save_for_backward(grad)
        return total * inv

    @staticmethod
    def backward(ctx, g):
        (grad,) = ctx.saved_tensors
        return grad * g.to(grad.dtype), None, None, None, None


def chunked_cross_entropy(hidden, weight, labels, denominator=None, chunk: int = 4096, check_labels: bool = True):
    """Mean next-token loss over labels != -100 (labels already shifted), or sum / denominator.
    `check_labels=False` when the caller checked them on the host (data.check_token_ids, as the
    trainer's collator does): the check here reads the GPU's answer, so the host waits for the
    whole forward at every micro-step (~0.7 ms of GPU idle an 8B step). Unchecked, a label outside
    the vocabulary is ignored as -100 is (the loss kernel never reads past a row)."""
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1)
    if denominator is None:
        denominator = max(int((labels != -100).sum()), 1)
    if isinstance(denominator, torch.Tensor):
        denominator = denominator.detach().to(hidden.device, torch.promote_types(hidden.dtype, torch.float32)).reshape(())
    else:
        denominator = float(denominator)
    if check_labels:
        _check_labels(labels, weight.shape[0])
    return ChunkedLinearCrossEntropy.apply(hidden, weight, labels, denominator, int(chunk))


def _check_labels(labels, vocab: int) -> None:
    bad = ((labels < 0) & (labels != -100)) | (labels >= vocab)
    if bool(bad.any()):
        value = int(labels[bad][0])
        raise ValueError(f"label {value} is outside the vocabulary (0..{vocab - 1}, or -100 to ignore)")
