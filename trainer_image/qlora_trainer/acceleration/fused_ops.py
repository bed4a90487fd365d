"""The element-wise and LoRA-side operations of the fused decoder layer (fused_layer.py).

Each operation has one plain-torch reference here; on a CUDA tensor with Triton available the
Triton kernel of the same name in `triton_ops` runs instead (one launch, one pass over memory, no
intermediate tensors). The references are what the CPU tests run and what the Triton kernels are
checked against (tests/test_acceleration_triton.py, in Triton's interpreter).

Shapes: token-major 2-D tensors, N tokens. LoRA tensors of `n` projections that share one input
are concatenated: A is [n*r, H] (projection j owns rows j*r:(j+1)*r), the A-side activations are
[N, n*r]. LoRA dropout: projection j's keep-mask is a pure function of (seed, j, token, column), so
backward regenerates it instead of keeping it; `dropout_mask` materialises it (tests only). A seed
is an int or a one-element int64 tensor on the data's device (the Triton kernels read it from
memory, so a captured CUDA graph draws new masks whenever the seed tensor changes).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

_TRITON: dict = {}


def _triton_ops():
    """The Triton module, or None (no Triton, or QLORA_TRITON=0)."""
    if "mod" not in _TRITON:
        mod = None
        if os.environ.get("QLORA_TRITON", "1") != "0":
            try:
                from . import triton_ops as mod  # noqa: PLC0415
            except Exception:  # noqa: BLE001  (no triton, or one too old)
                mod = None
        _TRITON["mod"] = mod
    return _TRITON["mod"]


def _acc(t: torch.Tensor) -> torch.dtype:
    """The accumulation dtype: fp32 for 16-bit inputs, the input's own for fp32/fp64."""
    return torch.promote_types(t.dtype, torch.float32)


def _kernel(t: torch.Tensor, name: str):
    mod = _triton_ops() if t.is_cuda else None
    return getattr(mod, name) if mod is not None else None


def _masked_kernel(t: torch.Tensor, name: str, width: int):
    """The masked LoRA kernels draw eight mask values per Philox call: widths divisible by 8 only
    (every real model's); any other width takes the reference for all three ops alike."""
    return _kernel(t, name) if width % 8 == 0 else None


# ---------------------------------------------------------------------------------------------
# RMSNorm: y = w * (x * rsqrt(mean(x^2) + eps)).to(x.dtype), statistics in fp32 (as transformers)


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float,
             out_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, H] -> (y [N, H] in out_dtype, default x.dtype; rstd [N] fp32). An fp32 x with a
    bf16 out_dtype is the plain recipe's fp32 norm followed by the cast its 4-bit layer makes:
    one rounding, at the end."""
    k = _kernel(x, "rms_norm")
    if k is not None:
        return k(x, w, eps, out_dtype)
    xf = x.to(_acc(x))
    rstd = torch.rsqrt(xf.pow(2).mean(-1) + eps)
    y = w.to(x.dtype) * (xf * rstd[:, None]).to(x.dtype)
    return y.to(out_dtype or x.dtype), rstd


def rms_norm_backward(gy: torch.Tensor, x: torch.Tensor, w: torch.Tensor, rstd: torch.Tensor,
                      residual: torch.Tensor | None = None, out: torch.Tensor | None = None,
                      compute_out: torch.Tensor | None = None, forward_into_gy: bool = False) -> torch.Tensor:
    """Gradient of rms_norm with respect to x (the norm weight is frozen), in x.dtype; with
    `residual` (the gradient that reaches x around the block), that gradient is added before the
    one rounding (one pass over the residual stream's gradient instead of two). Written into `out`
    when given (a graphed layer's gradient buffer: no copy after the kernel); `compute_out` also
    gets it cast (the compute-dtype copy the next block's GEMMs read: no cast kernel of its own).
    forward_into_gy: gy, once read, is overwritten by the forward's output rms_norm(x, w, eps,
    gy.dtype)[0] (rstd being that call's), which a LoRA A gradient needs next: the fused layer's
    backward gets it without another pass over the fp32 x (GPU: the same kernel writes it)."""
    k = _kernel(x, "rms_norm_backward")
    if k is not None:
        return k(gy, x, w, rstd, residual, out=out, compute_out=compute_out, forward_into_gy=forward_into_gy)
    if forward_into_gy:
        gx = rms_norm_backward(gy, x, w, rstd, residual, out, compute_out)
        xf = x.to(_acc(x))
        gy.copy_(w.to(x.dtype) * (xf * rstd[:, None]).to(x.dtype))
        return gx
    if compute_out is not None:
        gx = rms_norm_backward(gy, x, w, rstd, residual, out)
        compute_out.copy_(gx)
        return gx
    xhat = x.to(_acc(x)) * rstd[:, None]
    gn = gy.to(xhat.dtype) * w.to(xhat.dtype)
    gx = rstd[:, None] * (gn - xhat * (gn * xhat).mean(-1, keepdim=True))
    if residual is not None:
        if out is not None and out.dtype == gx.dtype:  # the fp32 stream: the sum itself is the result
            return torch.add(gx, residual.to(gx.dtype), out=out)
        gx = gx + residual.to(gx.dtype)
    return gx.to(x.dtype) if out is None else out.copy_(gx)


# ---------------------------------------------------------------------------------------------
# Rotary embedding, in place on [N, heads, D] views (HF convention: rotate_half of two halves)


def _rope_reference_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool) -> None:
    """Halves x1, x2 of each head: forward (x1 c1 - x2 s1, x2 c2 + x1 s2); backward the transposed
    rotation (x1 c1 + x2 s2, x2 c2 - x1 s1)."""
    d = x.shape[-1] // 2
    xf = x.to(_acc(x))
    c, s = cos.to(xf.dtype)[:, None, :], sin.to(xf.dtype)[:, None, :]
    x1, x2 = xf[..., :d], xf[..., d:]
    c1, c2, s1, s2 = c[..., :d], c[..., d:], s[..., :d], s[..., d:]
    if backward:
        out = (x1 * c1 + x2 * s2, x2 * c2 - x1 * s1)
    else:
        out = (x1 * c1 - x2 * s1, x2 * c2 + x1 * s2)
    x.copy_(torch.cat(out, dim=-1))


def rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """x[n, h] <- x[n, h] * cos[n] + rotate_half(x[n, h]) * sin[n]; x may be a strided view of a
    larger buffer (last dim contiguous). cos, sin: [N, D]."""
    k = _kernel(x, "rope_")
    if k is not None:
        k(x, cos, sin)
    else:
        _rope_reference_(x, cos, sin, backward=False)


def rope_backward_(g: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """In place: the gradient of rope_ with respect to its input (the transposed rotation)."""
    k = _kernel(g, "rope_backward_")
    if k is not None:
        k(g, cos, sin)
    else:
        _rope_reference_(g, cos, sin, backward=True)


def rope_backward_cat(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, cos: torch.Tensor,
                      sin: torch.Tensor) -> torch.Tensor:
    """The gradient of the q|k|v projection output from attention's dq [N, Hq, D], dk and dv
    [N, Hk, D] (views of any layout, as the attention backends return them): gqkv
    [N, (Hq + 2 Hk) * D] in dq's dtype, q and k heads through rope_backward_'s transposed rotation
    (fp32, one rounding), v heads copied unchanged. Exactly the concatenation followed by
    rope_backward_ on its q|k part, but written in one pass: the concatenation's copy and the
    in-place RoPE pass were two passes over the whole gradient."""
    k = _kernel(dq, "rope_backward_cat")
    if k is not None:
        return k(dq, dk, dv, cos, sin)
    n, hq, d = dq.shape
    hk = dk.shape[1]
    g = torch.empty(n, (hq + 2 * hk) * d, dtype=dq.dtype, device=dq.device)
    heads = g.view(n, hq + 2 * hk, d)
    heads[:, :hq], heads[:, hq:hq + hk], heads[:, hq + hk:] = dq, dk, dv
    _rope_reference_(heads[:, :hq + hk], cos, sin, backward=True)
    return g


def lora_rope_(qkv: torch.Tensor, a: torch.Tensor, B: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               rope_heads: int, head_dim: int) -> None:
    """In place on the q|k|v projection output qkv [N, heads * head_dim] (compute dtype): its
    adapter product a @ B^T (a [N, R], B [heads * head_dim, R]) is added in fp32, RoPE rotates the
    first `rope_heads` heads (q and k) in fp32, and each element is rounded once. The plain recipe
    adds each adapter product to its projection's output on an fp32 stream; rounded to bf16 before
    the addition, a young adapter's product of order 1e-3 survives only as rounding noise (issue
    19). One pass over qkv instead of the upcast, fp32 addmm, fp32 RoPE and downcast passes."""
    k = _kernel(qkv, "lora_rope_")
    if k is not None:
        k(qkv, a, B, cos, sin, rope_heads, head_dim)
        return
    acc = _acc(qkv)
    t = qkv.to(acc, copy=True).addmm_(a.to(acc), B.to(acc).t())
    _rope_reference_(t.view(t.shape[0], -1, head_dim)[:, :rope_heads], cos, sin, backward=False)
    qkv.copy_(t)


# ---------------------------------------------------------------------------------------------
# SwiGLU on the fused gate|up output


def swiglu(gu: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """gu [N, 2I] (gate in the first I columns, up in the last I) -> silu(gate) * up [N, I], in
    out_dtype (default gu's; an fp32 gu with a bf16 out_dtype rounds once, as the plain recipe)."""
    k = _kernel(gu, "swiglu")
    if k is not None:
        return k(gu, out_dtype)
    g, u = gu.to(_acc(gu)).chunk(2, dim=-1)
    return (F.silu(g) * u).to(out_dtype or gu.dtype)


def lora_swiglu_(gu: torch.Tensor, a: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """gate|up's adapter product added in fp32, then SwiGLU: gu [N, 2I] (compute dtype) becomes
    round(gu + a @ B^T) in place (what backward keeps) and the result is
    round(silu(g) * u) [N, I] from the unrounded fp32 g and u (a [N, R], B [2I, R]). One pass
    instead of the upcast, fp32 addmm, SwiGLU over fp32 and downcast passes."""
    k = _kernel(gu, "lora_swiglu_")
    if k is not None:
        return k(gu, a, B)
    acc = _acc(gu)
    t = gu.to(acc, copy=True).addmm_(a.to(acc), B.to(acc).t())
    g, u = t.chunk(2, dim=-1)
    m = (F.silu(g) * u).to(gu.dtype)
    gu.copy_(t)
    return m


def lora_residual_add(x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, B: torch.Tensor,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """x + (y + a @ B^T) in x.dtype, summed in fp32: a projection's output y (compute dtype) and its
    adapter product join the residual stream x (fp32) in one pass, as the plain recipe's
    `residual + hidden_states` on its fp32 stream. Written into `out` when given (a graphed layer's
    output buffer, the next layer's input: no copy after the kernel)."""
    k = _kernel(x, "lora_residual_add")
    if k is not None:
        return k(x, y, a, B, out=out)
    acc = torch.promote_types(x.dtype, _acc(y))
    t = y.to(acc, copy=True).addmm_(a.to(acc), B.to(acc).t())
    if out is not None and out.dtype == acc:  # the fp32 stream: the sum itself is the result
        return torch.add(x.to(acc), t, out=out)
    z = (x.to(acc) + t).to(x.dtype)
    return z if out is None else out.copy_(z)


def swiglu_backward(gh: torch.Tensor, gu: torch.Tensor, forward_into_gh: bool = False) -> torch.Tensor:
    """Gradient of swiglu: [N, I] -> [N, 2I] (d gate | d up), in gu.dtype. forward_into_gh: gh,
    once read, is overwritten by the forward's output swiglu(gu, gh.dtype), which down_proj's LoRA
    A gradient needs next: no pass of its own over gate|up (GPU: the same kernel writes it)."""
    k = _kernel(gu, "swiglu_backward")
    if k is not None:
        return k(gh, gu, forward_into_gh=forward_into_gh)
    g, u = gu.to(_acc(gu)).chunk(2, dim=-1)
    ghf = gh.to(g.dtype)
    s = torch.sigmoid(g)
    d_up = ghf * g * s
    d_gate = ghf * u * s * (1 + g * (1 - s))
    d = torch.cat((d_gate, d_up), dim=-1).to(gu.dtype)
    if forward_into_gh:
        gh.copy_(F.silu(g) * u)
    return d


# ---------------------------------------------------------------------------------------------
# The LoRA A side with dropout: a_j = (x * mask_j) @ A_j^T for n projections sharing x


def dropout_mask(seed: int, j: int, n_rows: int, n_cols: int, p: float, device) -> torch.Tensor:
    """Projection j's keep-mask (True = kept), as the operations below draw it on `device`."""
    k = _masked_kernel(torch.empty(0, device=device), "dropout_mask", n_cols)
    if k is not None:
        return k(seed, j, n_rows, n_cols, p, device)
    g = torch.Generator().manual_seed(int(seed) * 64 + int(j))  # a CPU seed tensor converts without a sync
    return (torch.rand(n_rows, n_cols, generator=g) >= p).to(device)


def _masked(x: torch.Tensor, seed: int, j: int, p: float) -> torch.Tensor:
    return x * dropout_mask(seed, j, x.shape[0], x.shape[1], p, x.device).to(x.dtype)


def lora_a(x: torch.Tensor, A: torch.Tensor, seed: int, p: float, n: int) -> torch.Tensor:
    """x [N, H], A [n*r, H] -> [N, n*r]: block j is (x * mask_j) @ A_j^T (no mask when p == 0).
    Any 1/(1-p) scale is the caller's, folded into A or B."""
    if p == 0:
        return x @ A.t()
    k = _masked_kernel(x, "lora_a", x.shape[1])
    if k is not None:
        return k(x, A, seed, p, n)
    r = A.shape[0] // n
    return torch.cat([_masked(x, seed, j, p) @ A[j * r:(j + 1) * r].t() for j in range(n)], dim=-1)


def lora_a_backward(ga: torch.Tensor, x: torch.Tensor, seed: int, p: float, n: int,
                    out: torch.Tensor | None = None, out_zeroed: bool = False) -> torch.Tensor:
    """The gradient of lora_a with respect to A: [n*r, H] fp32, block j = ga_j^T @ (x * mask_j);
    written into `out` (contiguous fp32) when given (a graphed layer's gradient sources).
    `out_zeroed`: the caller has zeroed `out` already (one fill for a whole layer's sources), so
    the kernel, which sums into it, does not fill it again; the result is the same."""
    if p == 0:
        g = (ga.t() @ x).to(_acc(x))
        return g if out is None else out.copy_(g)
    k = _masked_kernel(x, "lora_a_backward", x.shape[1])
    if k is not None:
        return k(ga, x, seed, p, n, out=out, out_zeroed=out_zeroed)
    r = ga.shape[1] // n
    parts = [(ga[:, j * r:(j + 1) * r].t() @ _masked(x, seed, j, p)).to(_acc(x)) for j in range(n)]
    return torch.cat(parts, dim=0) if out is None else torch.cat(parts, dim=0, out=out)


def lora_b_grads(g: torch.Tensor, a: torch.Tensor, B: torch.Tensor, rows: list[int],
                 out: torch.Tensor | None = None, out_zeroed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Both products of a LoRA set's output gradient g [N, W] (the projections' outputs side by
    side, rows[j] columns each) that the B side's backward needs: ga = g @ B [N, n*r] (B the set's
    block-diagonal [W, n*r], the A side's output gradient, in g's dtype) and gB [W, r] in fp32, row
    block j = g_j^T @ a_j (a [N, n*r] the forward's A-side output; into `out` when given: a graphed
    layer's gradient source; `out_zeroed` as in lora_a_backward). On a GPU one kernel reads g
    once for both (triton_ops.lora_b_grads), where two GEMMs per set read it twice (3 to 4 for a
    set of 2-3 projections): g is the widest tensor of a layer's backward after the weights."""
    k = _kernel(g, "lora_b_grads")
    if k is not None and _triton_ops().lora_b_grads_fits(rows):
        return k(g, a, B, rows, out=out, out_zeroed=out_zeroed)
    # Elsewhere (the CPU, or widths no column block divides) the GEMMs the kernel replaces, in g's
    # dtype: fp32 accumulation inside each, rounded once on output.
    n = len(rows)
    r = a.shape[1] // n
    starts = [sum(rows[:j]) for j in range(n)]
    gB = torch.cat([g[:, s:s + m].t() @ a[:, j * r:(j + 1) * r] for j, (s, m) in enumerate(zip(starts, rows))])
    return g @ B, (gB.to(_acc(g)) if out is None else out.copy_(gB))


def lora_grads_accumulate_(acc: torch.Tensor, src_a: torch.Tensor, src_b: torch.Tensor,
                           row_scale: torch.Tensor, rank: int) -> None:
    """In place, one pass over a graphed layer's LoRA gradients (acc fp32 [nA + nB]: the A
    gradients, then the B gradients): acc[:nA] += src_a (fp32), and acc[nA:] += float(src_b) *
    row_scale[row] (src_b the gB sums of lora_b_grads, rows of `rank` values): the very bits
    of the cast, the scaling and torch._foreach_add_ it replaces (LoRASet.grads), in one launch."""
    k = _kernel(acc, "lora_grads_accumulate_")
    if k is not None:
        k(acc, src_a, src_b, row_scale, rank)
        return
    n_a = src_a.numel()
    acc[:n_a].add_(src_a)
    acc[n_a:].view(-1, rank).add_(src_b.view(-1, rank).to(acc.dtype) * row_scale[:, None])


def lora_factors_(A: torch.Tensor, B: torch.Tensor, As: list[torch.Tensor], Bs: list[torch.Tensor],
                  scales: torch.Tensor) -> None:
    """A LoRA set's static factors, in place: A [n*r, in] <- the A_j [r, in] concatenated and cast
    to A's dtype; B's diagonal blocks B[rows of j, j*r:(j+1)*r] <- B_j * scales[j] (fp32 scales
    [n]), each product rounded once to B's dtype. The zeros around the blocks are not written.
    One kernel for the set on a GPU (fp32 factors, n <= 3) where this took one per projection
    plus one for the concatenation (~450 an 8B step, each a few microseconds, most of them the
    factor-refresh graph's ~1.2 ms: benchmarks/results/speed_profile_8b_session12_h200.md)."""
    if A.is_cuda and len(As) <= 3 and all(t.dtype == torch.float32 for t in (*As, *Bs)):
        k = _kernel(A, "lora_factors_")
        if k is not None:
            k(A, B, As, Bs, scales)
            return
    torch.cat(As, 0, out=A)  # the cast to A's dtype rounds as .to() does
    r, row = As[0].shape[0], 0
    for j, b in enumerate(Bs):
        torch.mul(b, scales[j], out=B[row:row + b.shape[0], j * r:(j + 1) * r])  # rounded once when stored
        row += b.shape[0]


def lora_x_backward_(gx: torch.Tensor, ga: torch.Tensor, A: torch.Tensor, seed: int, p: float, n: int) -> None:
    """In place: gx += sum_j (ga_j @ A_j) * mask_j, the input gradient of lora_a."""
    if p == 0:
        gx.addmm_(ga, A)
        return
    k = _masked_kernel(gx, "lora_x_backward_", gx.shape[1])
    if k is not None:
        k(gx, ga, A, seed, p, n)
        return
    r = A.shape[0] // n
    for j in range(n):
        part = ga[:, j * r:(j + 1) * r] @ A[j * r:(j + 1) * r]
        gx.add_(_masked(part, seed, j, p))


# ---------------------------------------------------------------------------------------------
# Cross-entropy over one chunk of logits, the gradient written over the logits


def cross_entropy_rows_(logits: torch.Tensor, labels: torch.Tensor, scale: float | torch.Tensor | None) -> torch.Tensor:
    """logits [C, V], labels [C] (-100, or any label outside 0..V-1: ignored) -> per-row loss [C] in the accumulation dtype
    (lse - logit[label], 0 for ignored rows), computed from the logits as given. With `scale`, the
    logits are overwritten with the loss's gradient times `scale`: (softmax - onehot(label)) *
    scale on valid rows, 0 on ignored ones, rounded once to the logits' dtype. `scale` may be a
    one-element fp32 tensor on the logits' device (never read by the host)."""
    k = _kernel(logits, "cross_entropy_rows_")
    if k is not None:
        return k(logits, labels, scale)
    lf = logits.to(_acc(logits))
    lse = torch.logsumexp(lf, dim=-1)
    valid = (labels >= 0) & (labels < logits.shape[1])  # as the kernel: outside the vocabulary, no loss
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    loss = torch.where(valid, lse - lf.gather(1, safe[:, None]).squeeze(1), torch.zeros_like(lse))
    if scale is not None:
        probs = lf.sub_(lse[:, None]).exp_()  # lf may be the logits themselves (fp32): overwritten anyway
        probs.scatter_add_(1, safe[:, None], -valid[:, None].to(probs.dtype))
        probs.mul_((valid.to(probs.dtype) * scale)[:, None])
        if probs is not logits:
            logits.copy_(probs)
    return loss
