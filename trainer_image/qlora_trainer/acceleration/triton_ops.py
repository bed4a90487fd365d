"""Triton kernels for the operations of fused_ops.py: same names, signatures and semantics.

fused_ops.py holds the plain-torch reference of every function here and is the specification;
its dispatcher calls these for CUDA tensors. Each is one launch that writes its output once, with
fp32 arithmetic and one rounding on the store; the element-wise kernels also read each input once
(the LoRA kernels read x once per projection, neighbouring programs sharing it through L2).

LoRA dropout: projection j's keep-mask is `_keep` below, a pure function of (seed, j, token,
column): element o = token * n_cols + column takes 16-bit half (o % 2) of output (o % 8) // 2 of
tl.randint4x(seed * 64 + j, o // 8) (Philox4x32-7), kept when that 16-bit uniform is at least
p * 65536; widths must be multiples of 8. Forward and both backward kernels regenerate it from
those eight numbers per Philox call (the masked kernels' dominant cost), so nothing is
stored; `dropout_mask` materialises it (tests only). Callers guarantee n_rows * n_cols < 2**31.

Token counts change from batch to batch with packed records: the kernels do not specialize on
them (do_not_specialize), so a new count never means a new compilation mid-training.

Importing this module needs Triton; fused_ops falls back to torch when the import fails.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import operator

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
_DOT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_TABLE_DTYPES = (torch.float64, *_FLOATS)  # cos and sin tables
_MAX_ROW = 65536  # the widest row the one-row-per-program kernels take (registers)
_MAX_SEED = 2**57  # seed * 64 + j stays below 2**63
_MAX_PROJECTIONS = 64  # j < 64 keeps the streams of different (seed, j) apart
# Philox rounds per mask draw: 7, the fewest that Philox4x32's authors found to pass the whole
# BigCrush battery (Salmon et al., SC'11; 10, Triton's default, is their safety margin). The
# masked LoRA kernels are bound by this arithmetic (benchmarks/NOTES.md); a dropout mask needs
# independent fair coins, which tests/test_acceleration_triton.py checks statistically.
_PHILOX_ROUNDS = tl.constexpr(7)


def _empty(shape, dtype, device) -> torch.Tensor:
    """Every output tensor a launcher allocates comes from here (the tests poison it)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _out(name: str, out: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A caller's output buffer (a graphed layer's static one: no copy after the kernel), checked to
    be what the launcher would allocate."""
    if not (out.shape == like.shape and out.dtype == like.dtype and out.device == like.device
            and out.is_contiguous()):
        raise ValueError(f"{name}: out must be contiguous {tuple(like.shape)} {like.dtype} on {like.device}, "
                         f"got {tuple(out.shape)} {out.dtype} on {out.device}")
    return out


def _device_of(t: torch.Tensor):
    """Launch on the tensor's GPU, not the current one."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


@functools.lru_cache(maxsize=16)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # Triton's interpreter on the CPU: size grids as for an H100


def _warps_for_row(block: int) -> int:
    return 4 if block <= 1024 else (8 if block <= 4096 else 16)


def _check_2d(name: str, t: torch.Tensor, dtypes=_FLOATS) -> None:
    if not (t.dim() == 2):
        raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise ValueError(f"{name} must have dtype in {dtypes}, got {t.dtype}")
    if not (t.is_contiguous()):
        raise ValueError(f"{name} must be contiguous (strides {t.stride()} for shape {tuple(t.shape)})")


def _check_same_device(**tensors: torch.Tensor) -> None:
    devices = {str(t.device) for t in tensors.values()}
    if not (len(devices) == 1):
        raise ValueError(f"{', '.join(tensors)} must be on one device, got {sorted(devices)}")


def _check_dropout(seed, p: float, n: int, n_rows: int, n_cols: int, device) -> torch.Tensor:
    """Validate the dropout arguments; the seed as a one-element int64 tensor on `device` (the
    kernels read it from memory, so a CUDA graph replays with whatever seed the tensor holds)."""
    if isinstance(seed, torch.Tensor):
        if not (seed.numel() == 1 and seed.dtype == torch.int64):
            raise ValueError(f"a seed tensor must hold one int64, got {seed.dtype} of shape {tuple(seed.shape)}")
        if not (seed.device == torch.device(device)):
            raise ValueError(f"the seed tensor is on {seed.device}, the data on {device}")
        seed_t = seed.reshape(1)
    else:
        try:
            seed = operator.index(seed)
        except TypeError:
            raise ValueError(f"seed must be an int or an int64 tensor, got {seed!r}") from None
        if not (0 <= seed < _MAX_SEED):
            raise ValueError(f"seed must be in [0, 2**57), got {seed}")
        seed_t = torch.tensor([seed], dtype=torch.int64, device=device)
    if not (0.0 <= float(p) < 1.0):
        raise ValueError(f"dropout p must be in [0, 1), got {p}")
    if not (1 <= n <= _MAX_PROJECTIONS):
        raise ValueError(f"n (projections) must be in [1, {_MAX_PROJECTIONS}], got {n}")
    if not (n_rows * n_cols < 2**31):
        raise ValueError(f"the mask offset row * n_cols + col must fit int32: {n_rows} x {n_cols}")
    if not (n_cols % 8 == 0):
        raise ValueError(f"masked ops need a width divisible by 8 (one Philox call per eight), got {n_cols}")
    return seed_t


# ---------------------------------------------------------------------------------------------
# The dropout keep-mask: the one definition every masked kernel uses


@triton.jit
def _keep(seed, j, rows, cols, n_cols, p):
    """Keep (True) or drop element (rows, cols) of projection j. rows [M, 1], cols [1, K] with
    K a multiple of 8, tiles starting at a column that is a multiple of 8, and n_cols % 8 == 0.
    Element o = row * n_cols + col takes the 16-bit half o % 2 of output (o % 8) // 2 of one
    Philox call at counter o // 8 (tl.randint4x) and is kept when it is >= p * 65536: a pure
    function of (seed, j, o), whatever the tile shape, at an eighth of the Philox work of one call
    per element (p is resolved to 1/65536)."""
    seed_j = seed.to(tl.int64) * 64 + j
    offsets = (rows * n_cols + cols).to(tl.int32)
    M: tl.constexpr = offsets.shape[0]
    K: tl.constexpr = offsets.shape[1]
    firsts, _ = tl.split(tl.reshape(offsets, (M, K // 8, 2, 2, 2)))
    firsts, _ = tl.split(firsts)
    firsts, _ = tl.split(firsts)  # [M, K/8]: the offset of each group of eight
    r0, r1, r2, r3 = tl.randint4x(seed_j, firsts // 8, _PHILOX_ROUNDS)
    lo = tl.join(tl.join(r0 & 0xFFFF, r2 & 0xFFFF), tl.join(r1 & 0xFFFF, r3 & 0xFFFF))
    hi = tl.join(tl.join(r0 >> 16, r2 >> 16), tl.join(r1 >> 16, r3 >> 16))
    u = tl.reshape(tl.join(lo, hi), (M, K))  # position 8c + 2k + h holds half h (0 low, 1 high) of r_k
    # u >= p * 65536 (fp32) exactly when u >= its ceiling, u being an integer: compared as integers,
    # the same masks without an int-to-float conversion per element (a quarter-rate instruction).
    return u >= tl.math.ceil(p * 65536.0).to(tl.uint32)


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    """acc + a @ b in fp32; fp32 inputs at full precision (no TF32), like torch's default matmul."""
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _dropout_mask_kernel(out_ptr, n_rows, n_cols, seed_ptr, j, p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    seed = tl.load(seed_ptr)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    inside = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    keep = _keep(seed, j, rows[:, None], cols[None, :], n_cols, p)
    ptrs = out_ptr + rows.to(tl.int64)[:, None] * n_cols + cols[None, :]
    tl.store(ptrs, keep.to(tl.uint8), mask=inside)


def dropout_mask(seed: int, j: int, n_rows: int, n_cols: int, p: float, device) -> torch.Tensor:
    """Projection j's keep-mask [n_rows, n_cols] (True = kept), exactly as the kernels draw it."""
    if not (0 <= int(j) < _MAX_PROJECTIONS):
        raise ValueError(f"dropout_mask: j must be in [0, {_MAX_PROJECTIONS}), got {j}")
    seed = _check_dropout(seed, p, int(j) + 1, n_rows, n_cols, device)
    if not (n_rows >= 0 and n_cols >= 0):
        raise ValueError(f"mask shape must be non-negative, got {n_rows} x {n_cols}")
    out = _empty((n_rows, n_cols), torch.uint8, torch.device(device))
    if out.numel():
        block_m, block_n = 32, 128
        grid = (triton.cdiv(n_rows, block_m), triton.cdiv(n_cols, block_n))
        with _device_of(out):
            _dropout_mask_kernel[grid](out, n_rows, n_cols, seed, int(j), float(p),
                                       BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4)
    return out.view(torch.bool)


# ---------------------------------------------------------------------------------------------
# RMSNorm: one program per row, the whole row in registers


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, H, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    inside = cols < H
    out_ty = y_ptr.dtype.element_ty
    x_ty = x_ptr.dtype.element_ty
    x = tl.load(x_ptr + row * H + cols, mask=inside, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / H + eps)
    # As the reference: the normalised row is rounded to x.dtype, the weight too, then multiplied
    # and rounded once to the output's dtype (an fp32 residual stream: no rounding before that).
    xhat = (x * rstd).to(x_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=inside, other=0.0).to(x_ty).to(tl.float32)
    tl.store(y_ptr + row * H + cols, (w * xhat).to(out_ty), mask=inside)
    tl.store(rstd_ptr + row, rstd)


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float,
             out_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, H] -> (y [N, H] in out_dtype, default x.dtype; rstd [N] fp32)."""
    _check_2d("rms_norm: x", x)
    if not (w.dim() == 1 and w.shape[0] == x.shape[1]):
        raise ValueError(f"rms_norm: w must be [{x.shape[1]}], got {tuple(w.shape)}")
    if not (w.dtype in _FLOATS and w.is_contiguous()):
        raise ValueError(f"rms_norm: w must be a contiguous float tensor ({w.dtype})")
    _check_same_device(x=x, w=w)
    N, H = x.shape
    if not (H <= _MAX_ROW):
        raise ValueError(f"rms_norm: rows wider than {_MAX_ROW} are not supported, got H={H}")
    y = _empty((N, H), out_dtype or x.dtype, x.device)
    rstd = _empty((N,), torch.float32, x.device)
    if N and H:
        block = triton.next_power_of_2(H)
        with _device_of(x):
            _rms_norm_kernel[(N,)](x, w, y, rstd, H, float(eps), BLOCK=block, num_warps=_warps_for_row(block))
    return y, rstd


@triton.jit
def _rms_norm_backward_kernel(gy_ptr, x_ptr, w_ptr, rstd_ptr, res_ptr, gx_ptr, gxc_ptr, H, BLOCK: tl.constexpr,
                              RESIDUAL: tl.constexpr, COMPUTE: tl.constexpr, FORWARD: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    inside = cols < H
    x = tl.load(x_ptr + row * H + cols, mask=inside, other=0.0).to(tl.float32)
    gy = tl.load(gy_ptr + row * H + cols, mask=inside, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=inside, other=0.0).to(tl.float32)
    rstd = tl.load(rstd_ptr + row)
    xhat = x * rstd
    gn = gy * w
    dot = tl.sum(gn * xhat, axis=0) / H
    if FORWARD:  # over gy: _rms_norm_kernel's output, its roundings in its order
        x_ty = x_ptr.dtype.element_ty
        y = w.to(x_ty).to(tl.float32) * xhat.to(x_ty).to(tl.float32)
        # every thread's load of gy (a row narrower than the program's threads is loaded by
        # several) is done before any of them writes over it
        tl.debug_barrier()
        tl.store(gy_ptr + row * H + cols, y.to(gy_ptr.dtype.element_ty), mask=inside)
    gx = rstd * (gn - xhat * dot)
    if RESIDUAL:
        gx += tl.load(res_ptr + row * H + cols, mask=inside, other=0.0).to(tl.float32)
    gx = gx.to(gx_ptr.dtype.element_ty)
    tl.store(gx_ptr + row * H + cols, gx, mask=inside)
    if COMPUTE:  # the stored gradient rounded (to nearest even, as torch's cast) to the compute dtype
        tl.store(gxc_ptr + row * H + cols, gx.to(gxc_ptr.dtype.element_ty, fp_downcast_rounding="rtne"),
                 mask=inside)


def rms_norm_backward(gy: torch.Tensor, x: torch.Tensor, w: torch.Tensor, rstd: torch.Tensor,
                      residual: torch.Tensor | None = None, out: torch.Tensor | None = None,
                      compute_out: torch.Tensor | None = None, forward_into_gy: bool = False) -> torch.Tensor:
    """Gradient of rms_norm with respect to x (the norm weight is frozen), in x.dtype; plus
    `residual` [N, H] (added in fp32 before the one rounding) when given; into `out` when given;
    `compute_out` (contiguous [N, H], a float dtype) also gets it cast, as .to() casts it;
    forward_into_gy: gy then holds rms_norm(x, w, eps, gy.dtype)[0] bit for bit (rstd is that
    call's), each row written once the kernel has read it."""
    _check_2d("rms_norm_backward: x", x)
    _check_2d("rms_norm_backward: gy", gy)
    if not (gy.shape == x.shape):
        raise ValueError(f"rms_norm_backward: gy {tuple(gy.shape)} and x {tuple(x.shape)} differ in shape")
    if forward_into_gy and any(t is not None and t.data_ptr() == gy.data_ptr() for t in (residual, out, compute_out)):
        raise ValueError("rms_norm_backward: forward_into_gy overwrites gy, which must not also be residual, out "
                         "or compute_out")
    N, H = x.shape
    if not (w.dim() == 1 and w.shape[0] == H and w.is_contiguous() and w.dtype in _FLOATS):
        raise ValueError(f"rms_norm_backward: w must be a contiguous float [{H}], got {tuple(w.shape)} {w.dtype}")
    if not (rstd.dim() == 1 and rstd.shape[0] == N and rstd.dtype == torch.float32 and rstd.is_contiguous()):
        raise ValueError(f"rms_norm_backward: rstd must be contiguous fp32 [{N}], got {tuple(rstd.shape)} {rstd.dtype}")
    _check_same_device(gy=gy, x=x, w=w, rstd=rstd)
    if not (H <= _MAX_ROW):
        raise ValueError(f"rms_norm_backward: rows wider than {_MAX_ROW} are not supported, got H={H}")
    if residual is not None:
        _check_2d("rms_norm_backward: residual", residual)
        if not (residual.shape == x.shape):
            raise ValueError(f"rms_norm_backward: residual {tuple(residual.shape)} and x {tuple(x.shape)} differ")
        _check_same_device(x=x, residual=residual)
    gx = _out("rms_norm_backward", out, x) if out is not None else _empty((N, H), x.dtype, x.device)
    if compute_out is not None:
        if not (compute_out.shape == x.shape and compute_out.is_contiguous() and compute_out.device == x.device
                and compute_out.dtype in _FLOATS):
            raise ValueError(f"rms_norm_backward: compute_out must be a contiguous float {tuple(x.shape)} on "
                             f"{x.device}, got {tuple(compute_out.shape)} {compute_out.dtype}")
    if N and H:
        block = triton.next_power_of_2(H)
        with _device_of(x):
            _rms_norm_backward_kernel[(N,)](gy, x, w, rstd, gx if residual is None else residual, gx,
                                            gx if compute_out is None else compute_out, H, BLOCK=block,
                                            RESIDUAL=residual is not None, COMPUTE=compute_out is not None,
                                            FORWARD=bool(forward_into_gy), num_warps=_warps_for_row(block))
    return gx


# ---------------------------------------------------------------------------------------------
# Rotary embedding. The (token, head) pairs of a [N, heads, D] view are numbered token-major and each
# program takes BLOCK_ROWS of them, both halves of each head: full tiles however few heads a view has
# (a K view of 2 heads gets the same tiles as a Q view of 28). cos/sin rows are re-read per head,
# from cache. One tile function serves the in-place rotations (source = destination) and
# rope_backward_cat (three sources, one destination).

# _rope_tile's MODE: the rotation, the transposed rotation (its gradient), the identity (a copy)
_ROPE_ROTATE, _ROPE_BACKWARD, _ROPE_COPY = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)


@triton.jit
def _rope_tables(cos_ptr, sin_ptr, tok, stride_cos, stride_sin, d, HALF, mask, COS_OTHER: tl.constexpr):
    """Both halves of the cos and sin rows of tokens `tok` (columns d and d + HALF), in fp32."""
    c_ptrs = cos_ptr + (tok * stride_cos)[:, None] + d[None, :]
    s_ptrs = sin_ptr + (tok * stride_sin)[:, None] + d[None, :]
    c1 = tl.load(c_ptrs, mask=mask, other=COS_OTHER).to(tl.float32)
    c2 = tl.load(c_ptrs + HALF, mask=mask, other=COS_OTHER).to(tl.float32)
    s1 = tl.load(s_ptrs, mask=mask, other=0.0).to(tl.float32)
    s2 = tl.load(s_ptrs + HALF, mask=mask, other=0.0).to(tl.float32)
    return c1, c2, s1, s2


@triton.jit
def _rope_tile(src_ptr, dst_ptr, cos_ptr, sin_ptr, block, n_rows, heads, src_stride_n, src_stride_h, dst_stride_n,
               dst_stride_h, stride_cos, stride_sin, HALF, BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
               MODE: tl.constexpr):
    """Rows block*BLOCK_ROWS.. of the (token, head) pairs of src [N, heads, 2*HALF] (strides
    src_stride_n, src_stride_h, 1) rotated (MODE 0), rotated back (1) or copied (2) into the same
    (token, head) of dst (strides dst_stride_n, dst_stride_h, 1), rounded once to dst's dtype."""
    rows = block.to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    tok = rows // heads
    head = rows % heads
    d = tl.arange(0, BLOCK_D)
    inside = (rows < n_rows)[:, None] & (d < HALF)[None, :]
    src = src_ptr + (tok * src_stride_n + head * src_stride_h)[:, None] + d[None, :]
    dst = dst_ptr + (tok * dst_stride_n + head * dst_stride_h)[:, None] + d[None, :]
    out_ty = dst_ptr.dtype.element_ty
    if MODE == _ROPE_COPY:  # no arithmetic, no cos/sin traffic: the values themselves
        tl.store(dst, tl.load(src, mask=inside).to(out_ty), mask=inside)
        tl.store(dst + HALF, tl.load(src + HALF, mask=inside).to(out_ty), mask=inside)
    else:
        c1, c2, s1, s2 = _rope_tables(cos_ptr, sin_ptr, tok, stride_cos, stride_sin, d, HALF, inside, 0.0)
        x1 = tl.load(src, mask=inside, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF, mask=inside, other=0.0).to(tl.float32)
        if MODE == _ROPE_BACKWARD:  # the transposed rotation
            o1 = x1 * c1 + x2 * s2
            o2 = x2 * c2 - x1 * s1
        else:
            o1 = x1 * c1 - x2 * s1
            o2 = x2 * c2 + x1 * s2
        tl.store(dst, o1.to(out_ty), mask=inside)
        tl.store(dst + HALF, o2.to(out_ty), mask=inside)


@triton.jit(do_not_specialize=['n_rows'])
def _rope_kernel(x_ptr, cos_ptr, sin_ptr, n_rows, heads, stride_n, stride_h, stride_cos, stride_sin, HALF,
                 BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr, MODE: tl.constexpr):
    _rope_tile(x_ptr, x_ptr, cos_ptr, sin_ptr, tl.program_id(0), n_rows, heads, stride_n, stride_h, stride_n,
               stride_h, stride_cos, stride_sin, HALF, BLOCK_ROWS, BLOCK_D, MODE)


def _rope_blocks(D: int) -> tuple[int, int, int]:
    """(half, BLOCK_D, BLOCK_ROWS) of a head dim D: tiles of about 2048 pairs of values."""
    half = D // 2
    block_d = triton.next_power_of_2(half)
    return half, block_d, max(1, 2048 // block_d)


def _check_rope_tables(name: str, cos: torch.Tensor, sin: torch.Tensor, N: int, D: int) -> None:
    for nm, t in (("cos", cos), ("sin", sin)):
        if not (t.dim() == 2 and tuple(t.shape) == (N, D)):
            raise ValueError(f"{name}: {nm} must be [{N}, {D}], got {tuple(t.shape)}")
        if t.dtype not in _TABLE_DTYPES:
            raise ValueError(f"{name}: {nm} must be a float tensor, got {t.dtype}")
        if not (t.stride(1) == 1):
            raise ValueError(f"{name}: {nm}'s last dim must be contiguous, strides {t.stride()}")


def _rope_launch(name: str, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool) -> None:
    if not (x.dim() == 3):
        raise ValueError(f"{name}: x must be [N, heads, D], got shape {tuple(x.shape)}")
    if x.dtype not in _FLOATS:
        raise ValueError(f"{name}: x must be a float tensor, got {x.dtype}")
    N, heads, D = x.shape
    if not (D % 2 == 0):
        raise ValueError(f"{name}: the head dim must be even, got {D}")
    if not (x.stride(2) == 1 or D == 1):
        raise ValueError(f"{name}: x's last dim must be contiguous, strides {x.stride()}")
    _check_rope_tables(name, cos, sin, N, D)
    _check_same_device(x=x, cos=cos, sin=sin)
    if not (N and heads and D):
        return
    half, block_d, block_rows = _rope_blocks(D)
    grid = (triton.cdiv(N * heads, block_rows),)
    with _device_of(x):
        _rope_kernel[grid](x, cos, sin, N * heads, heads, x.stride(0), x.stride(1), cos.stride(0), sin.stride(0),
                           half, BLOCK_ROWS=block_rows, BLOCK_D=block_d,
                           MODE=(_ROPE_BACKWARD if backward else _ROPE_ROTATE).value, num_warps=4)


def rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """In place on x [N, heads, D] (a strided view is fine; last dim contiguous); cos, sin [N, D]:
    x1, x2 = halves of x; x <- (x1*c1 - x2*s1, x2*c2 + x1*s2)."""
    _rope_launch("rope_", x, cos, sin, backward=False)


def rope_backward_(g: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """In place: the gradient of rope_ with respect to its input (the transposed rotation)."""
    _rope_launch("rope_backward_", g, cos, sin, backward=True)


@triton.jit(do_not_specialize=['N'])
def _rope_backward_cat_kernel(dq_ptr, dk_ptr, dv_ptr, out_ptr, cos_ptr, sin_ptr, N, HQ, HK, q_stride_n, q_stride_h,
                              k_stride_n, k_stride_h, v_stride_n, v_stride_h, W, stride_cos, stride_sin, HALF,
                              BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    # One launch, three program ranges: dq's tiles, then dk's, then dv's, each source's own
    # (token, head) numbering (so the tiles of every range are full), written at its heads' columns.
    pid = tl.program_id(0)
    q_blocks = tl.cdiv(N * HQ, BLOCK_ROWS)
    k_blocks = tl.cdiv(N * HK, BLOCK_ROWS)
    D = 2 * HALF
    if pid < q_blocks:
        _rope_tile(dq_ptr, out_ptr, cos_ptr, sin_ptr, pid, N * HQ, HQ, q_stride_n, q_stride_h, W, D, stride_cos,
                   stride_sin, HALF, BLOCK_ROWS, BLOCK_D, _ROPE_BACKWARD)
    elif pid < q_blocks + k_blocks:
        _rope_tile(dk_ptr, out_ptr + HQ * D, cos_ptr, sin_ptr, pid - q_blocks, N * HK, HK, k_stride_n, k_stride_h,
                   W, D, stride_cos, stride_sin, HALF, BLOCK_ROWS, BLOCK_D, _ROPE_BACKWARD)
    else:
        _rope_tile(dv_ptr, out_ptr + (HQ + HK) * D, cos_ptr, sin_ptr, pid - q_blocks - k_blocks, N * HK, HK,
                   v_stride_n, v_stride_h, W, D, stride_cos, stride_sin, HALF, BLOCK_ROWS, BLOCK_D, _ROPE_COPY)


def rope_backward_cat(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, cos: torch.Tensor,
                      sin: torch.Tensor) -> torch.Tensor:
    """See fused_ops.rope_backward_cat: dq [N, Hq, D], dk and dv [N, Hk, D] (strided views are fine;
    last dim contiguous; one dtype) -> gqkv [N, (Hq + 2 Hk) * D], contiguous, in one launch."""
    name = "rope_backward_cat"
    for nm, t in (("dq", dq), ("dk", dk), ("dv", dv)):
        if not (t.dim() == 3):
            raise ValueError(f"{name}: {nm} must be [N, heads, D], got shape {tuple(t.shape)}")
        if t.dtype not in _FLOATS:
            raise ValueError(f"{name}: {nm} must be a float tensor, got {t.dtype}")
        if not (t.dtype == dq.dtype):
            raise ValueError(f"{name}: {nm} ({t.dtype}) must have dq's dtype ({dq.dtype})")
        if not (t.stride(2) == 1):
            raise ValueError(f"{name}: {nm}'s last dim must be contiguous, strides {t.stride()}")
    N, HQ, D = dq.shape
    HK = dk.shape[1]
    if not (dk.shape[0] == N and dk.shape[2] == D and tuple(dv.shape) == tuple(dk.shape)):
        raise ValueError(f"{name}: dk and dv must both be [{N}, Hk, {D}], got {tuple(dk.shape)} and {tuple(dv.shape)}")
    if not (D > 0 and D % 2 == 0):
        raise ValueError(f"{name}: the head dim must be even, got {D}")
    _check_rope_tables(name, cos, sin, N, D)
    _check_same_device(dq=dq, dk=dk, dv=dv, cos=cos, sin=sin)
    W = (HQ + 2 * HK) * D
    out = _empty((N, W), dq.dtype, dq.device)
    if not (N and W):
        return out
    half, block_d, block_rows = _rope_blocks(D)
    grid = (triton.cdiv(N * HQ, block_rows) + 2 * triton.cdiv(N * HK, block_rows),)
    with _device_of(dq):
        _rope_backward_cat_kernel[grid](dq, dk, dv, out, cos, sin, N, HQ, HK, dq.stride(0), dq.stride(1),
                                        dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), W, cos.stride(0),
                                        sin.stride(0), half, BLOCK_ROWS=block_rows, BLOCK_D=block_d, num_warps=4)
    return out


# ---------------------------------------------------------------------------------------------
# A projection's adapter product joined to its output in fp32, fused with what follows it:
# RoPE (q|k|v), SwiGLU (gate|up) or the residual add (o, down). The rank-R product is a small
# tl.dot per tile (R <= 256 padded to a power of two), so the fp32 sum never goes to memory.


def _check_adapter(name: str, out: torch.Tensor, a: torch.Tensor, B: torch.Tensor, width: int) -> int:
    """out [N, ...], a [N, R], B [width, R] with a and B of one dot dtype; returns R."""
    _check_2d(f"{name}: a", a, _DOT_DTYPES)
    _check_2d(f"{name}: B", B, _DOT_DTYPES)
    if not (a.dtype == B.dtype):
        raise ValueError(f"{name}: a ({a.dtype}) and B ({B.dtype}) must have one dtype")
    if not (a.shape[0] == out.shape[0] and B.shape[0] == width and B.shape[1] == a.shape[1]):
        raise ValueError(f"{name}: a {tuple(a.shape)} and B {tuple(B.shape)} must be [{out.shape[0]}, R] and "
                         f"[{width}, R]")
    if not (1 <= a.shape[1] <= 256):
        raise ValueError(f"{name}: the adapter width R must be in [1, 256], got {a.shape[1]}")
    _check_same_device(out=out, a=a, B=B)
    return a.shape[1]


@triton.jit
def _lora_rope_head(qkv_ptr, b_ptr, at, cos1, cos2, sin1, sin2, rows64, d, rr, inside, b_in, W, R, heads, rope_heads,
                    HALF, head, IEEE: tl.constexpr):
    """One head of a token block: its adapter product added to both halves, then rotated, in place."""
    head_in = ((d * 0 + head) < heads)[None, :]  # the last program's heads may run past the end
    here = inside & head_in
    c1 = head * 2 * HALF + d
    ptrs = qkv_ptr + rows64[:, None] * W + c1[None, :]
    x1 = tl.load(ptrs, mask=here, other=0.0).to(tl.float32)
    x2 = tl.load(ptrs + HALF, mask=here, other=0.0).to(tl.float32)
    b_ptrs = b_ptr + c1.to(tl.int64)[None, :] * R + rr[:, None]  # B^T tile [R, D]
    b_here = b_in & head_in
    x1 = _dot(at, tl.load(b_ptrs, mask=b_here, other=0.0), x1, IEEE)
    x2 = _dot(at, tl.load(b_ptrs + HALF * R, mask=b_here, other=0.0), x2, IEEE)
    # v heads (head >= rope_heads) take cos 1 and sin 0: the rotation is then exactly the identity.
    rope = (d * 0 + head) < rope_heads
    c1h, c2h = tl.where(rope[None, :], cos1, 1.0), tl.where(rope[None, :], cos2, 1.0)
    s1h, s2h = tl.where(rope[None, :], sin1, 0.0), tl.where(rope[None, :], sin2, 0.0)
    out_ty = qkv_ptr.dtype.element_ty
    tl.store(ptrs, (x1 * c1h - x2 * s1h).to(out_ty), mask=here)
    tl.store(ptrs + HALF, (x2 * c2h + x1 * s2h).to(out_ty), mask=here)


@triton.jit(do_not_specialize=['N'])
def _lora_rope_kernel(qkv_ptr, a_ptr, b_ptr, cos_ptr, sin_ptr, N, W, R, heads, rope_heads, stride_cos, stride_sin,
                      HALF, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, IEEE: tl.constexpr,
                      HEADS: tl.constexpr, LOOP: tl.constexpr, STAGES: tl.constexpr):
    # One program per (block of tokens, HEADS consecutive heads): both halves of each head, so RoPE
    # pairs are local; the tokens' cos, sin and adapter inputs are read once for all HEADS heads.
    # The heads are unrolled, or with LOOP walked by a loop keeping STAGES heads' loads in flight.
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    rr = tl.arange(0, BLOCK_R)
    row_in, d_in, r_in = rows < N, d < HALF, rr < R
    rows64 = rows.to(tl.int64)
    inside = row_in[:, None] & d_in[None, :]
    at = tl.load(a_ptr + rows64[:, None] * R + rr[None, :], mask=row_in[:, None] & r_in[None, :], other=0.0)
    cos1, cos2, sin1, sin2 = _rope_tables(cos_ptr, sin_ptr, rows64, stride_cos, stride_sin, d, HALF, inside, 1.0)
    b_in = r_in[:, None] & d_in[None, :]
    first = tl.program_id(1) * HEADS
    if LOOP:
        for i in tl.range(0, HEADS, num_stages=STAGES):
            _lora_rope_head(qkv_ptr, b_ptr, at, cos1, cos2, sin1, sin2, rows64, d, rr, inside, b_in, W, R, heads,
                            rope_heads, HALF, first + i, IEEE)
    else:
        for i in tl.static_range(HEADS):
            _lora_rope_head(qkv_ptr, b_ptr, at, cos1, cos2, sin1, sin2, rows64, d, rr, inside, b_in, W, R, heads,
                            rope_heads, HALF, first + i, IEEE)


@dataclasses.dataclass(frozen=True)
class EpilogueLaunch:
    """How an adapter epilogue kernel tiles its work (benchmarks/epilogue_timing.py times these):
    token rows per program, columns per program (lora_swiglu_) or heads per program (lora_rope_),
    and warps."""

    block_m: int
    block_n: int = 0
    heads: int = 1
    warps: int = 4
    programs_per_sm: int = 0  # lora_swiglu_: 0 a program a tile; N > 0, N programs an SM, each walking tiles
    stages: int = 1  # ... in a loop that keeps this many tiles' loads in flight (software pipelining)
    heads_loop: bool = False  # lora_rope_: a program's heads in a loop (`stages` heads' loads in flight), not unrolled


# 64 tokens a program, its 12 heads walked in a loop with three heads' loads in flight (the token
# block's cos, sin and adapter input read once for all of them): 8B 34.4 -> 24.1 us a call, 7B
# 27.7 -> 24.0, the same bits (session 17, results/epilogue_timing_session17_h200.md)
LORA_ROPE_LAUNCH = EpilogueLaunch(block_m=64, heads=12, warps=8, heads_loop=True, stages=3)
# ... whose pipelined B tiles need 238 KB of shared memory at adapter widths above 128 (rank 43 and
# up; 66 KB at rank 16): steps down as lora_swiglu_'s does, to session 11's one head a program last
LORA_ROPE_FALLBACKS = (
    EpilogueLaunch(block_m=64, heads=12, warps=8, heads_loop=True, stages=2),
    EpilogueLaunch(block_m=16, heads=12, warps=4, heads_loop=True, stages=2),
    EpilogueLaunch(block_m=64, heads=1, warps=4),
)
# persistent, four tiles' loads in flight: 8B 109.8 -> 84.2 us a call, 7B 143.7 -> 107.9 (session 16)
LORA_SWIGLU_LAUNCH = EpilogueLaunch(block_m=64, block_n=128, warps=8, programs_per_sm=1, stages=4)
# ... which needs the most shared memory: its pipelined stages hold B's gate and up tiles, [R, 128]
# each (sm_90, bf16: 156 KB at R 16, 197 KB at 32, 279 KB at 64 against the H100/H200's 227 KB; an
# A100 has 163 KB, an L4 or an RTX card 99 KB). A launch that does not fit the card steps down to
# the next of these, fewer stages first, then session 11's one tile a program.
LORA_SWIGLU_FALLBACKS = (
    EpilogueLaunch(block_m=64, block_n=128, warps=8, programs_per_sm=1, stages=3),
    EpilogueLaunch(block_m=64, block_n=128, warps=8, programs_per_sm=1, stages=2),
    EpilogueLaunch(block_m=64, block_n=128, warps=8),
    EpilogueLaunch(block_m=32, block_n=64, warps=4),
)
_FITTING_LAUNCH: dict = {}  # (kernel, what its compilation depends on) -> the first launch that fit


def _first_fitting_launch(kernel: str, key: tuple, launches: tuple, run) -> EpilogueLaunch:
    """run(launch) with the first of `launches` whose compiled kernel fits the device's shared
    memory (Triton raises OutOfResources before anything runs), remembered per key; the last
    one's error propagates when none fits."""
    memo = (kernel, key)
    for i in range(_FITTING_LAUNCH.get(memo, 0), len(launches)):
        try:
            run(launches[i])
        except OutOfResources:
            if i == len(launches) - 1:
                raise
            continue
        _FITTING_LAUNCH[memo] = i
        return launches[i]
    raise AssertionError("unreachable: the loop returns or raises")


def lora_rope_(qkv: torch.Tensor, a: torch.Tensor, B: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               rope_heads: int, head_dim: int, launch: EpilogueLaunch | None = None) -> None:
    """See fused_ops.lora_rope_: qkv [N, heads * head_dim] in place. `launch`: LORA_ROPE_LAUNCH
    unless given (the timing benchmark's variants)."""
    _check_2d("lora_rope_: qkv", qkv)
    N, W = qkv.shape
    if not (head_dim > 0 and head_dim % 2 == 0 and W % head_dim == 0):
        raise ValueError(f"lora_rope_: head_dim must be even and divide the width {W}, got {head_dim}")
    heads = W // head_dim
    if not (0 <= rope_heads <= heads):
        raise ValueError(f"lora_rope_: rope_heads must be in [0, {heads}], got {rope_heads}")
    R = _check_adapter("lora_rope_", qkv, a, B, W)
    for nm, t in (("cos", cos), ("sin", sin)):
        if not (t.dim() == 2 and tuple(t.shape) == (N, head_dim) and t.stride(1) == 1 and t.dtype in _TABLE_DTYPES):
            raise ValueError(f"lora_rope_: {nm} must be a float [{N}, {head_dim}] with a contiguous last dim, "
                             f"got {tuple(t.shape)} {t.dtype}")
    _check_same_device(qkv=qkv, cos=cos, sin=sin)
    if not (N and W):
        return
    half = head_dim // 2
    if launch is not None and launch.programs_per_sm:
        raise ValueError("lora_rope_: no persistent launch (programs_per_sm): it measured slower than a program a "
                         "tile (benchmarks/results/epilogue_timing_session16_h200.md)")
    block_d, block_r = max(16, triton.next_power_of_2(half)), max(16, triton.next_power_of_2(R))
    ieee = a.dtype == torch.float32

    def run(launch: EpilogueLaunch) -> None:
        grid = (triton.cdiv(N, launch.block_m), triton.cdiv(heads, launch.heads))
        with _device_of(qkv):
            _lora_rope_kernel[grid](qkv, a, B, cos, sin, N, W, R, heads, int(rope_heads), cos.stride(0),
                                    sin.stride(0), half, BLOCK_M=launch.block_m, BLOCK_D=block_d, BLOCK_R=block_r,
                                    IEEE=ieee, HEADS=launch.heads, LOOP=launch.heads_loop, STAGES=launch.stages,
                                    num_warps=launch.warps)

    if launch is not None:  # a variant asked for by name (the timing benchmark): that one or its error
        run(launch)
    else:
        key = (block_d, block_r, ieee, qkv.dtype, a.dtype, B.dtype, cos.dtype, qkv.device)
        _first_fitting_launch("lora_rope_", key, (LORA_ROPE_LAUNCH, *LORA_ROPE_FALLBACKS), run)


@triton.jit
def _lora_swiglu_tile(gu_ptr, a_ptr, b_ptr, h_ptr, N, inter, R, pid_m, pid_n, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, IEEE: tl.constexpr):
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rr = tl.arange(0, BLOCK_R)
    row_in, col_in, r_in = rows < N, cols < inter, rr < R
    rows64, cols64 = rows.to(tl.int64), cols.to(tl.int64)
    inside = row_in[:, None] & col_in[None, :]
    ptrs = gu_ptr + rows64[:, None] * (2 * inter) + cols[None, :]
    g = tl.load(ptrs, mask=inside, other=0.0).to(tl.float32)
    u = tl.load(ptrs + inter, mask=inside, other=0.0).to(tl.float32)
    at = tl.load(a_ptr + rows64[:, None] * R + rr[None, :], mask=row_in[:, None] & r_in[None, :], other=0.0)
    b_ptrs = b_ptr + cols64[None, :] * R + rr[:, None]  # B^T tile [R, N] of the gate rows, then the up rows
    b_in = r_in[:, None] & col_in[None, :]
    g = _dot(at, tl.load(b_ptrs, mask=b_in, other=0.0), g, IEEE)
    u = _dot(at, tl.load(b_ptrs + inter * R, mask=b_in, other=0.0), u, IEEE)
    out_ty = gu_ptr.dtype.element_ty
    tl.store(ptrs, g.to(out_ty), mask=inside)
    tl.store(ptrs + inter, u.to(out_ty), mask=inside)
    h = g * tl.sigmoid(g) * u
    tl.store(h_ptr + rows64[:, None] * inter + cols[None, :], h.to(h_ptr.dtype.element_ty), mask=inside)


@triton.jit(do_not_specialize=['N'])
def _lora_swiglu_kernel(gu_ptr, a_ptr, b_ptr, h_ptr, N, inter, R, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_R: tl.constexpr, IEEE: tl.constexpr):
    _lora_swiglu_tile(gu_ptr, a_ptr, b_ptr, h_ptr, N, inter, R, tl.program_id(0), tl.program_id(1),
                      BLOCK_M, BLOCK_N, BLOCK_R, IEEE)


@triton.jit(do_not_specialize=['N'])
def _lora_swiglu_persistent_kernel(gu_ptr, a_ptr, b_ptr, h_ptr, N, inter, R, tiles_per_program,
                                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                                   IEEE: tl.constexpr, STAGES: tl.constexpr):
    # a fixed number of programs, each walking tiles (token blocks fastest, so programs that run
    # together share B's columns); the loop lets the compiler issue a tile's loads while the one
    # before it is still being computed and stored. A tile past the last one is masked out whole.
    tiles_m = tl.cdiv(N, BLOCK_M)
    first, step = tl.program_id(0), tl.num_programs(0)
    for i in tl.range(0, tiles_per_program, num_stages=STAGES):
        t = first + i * step
        _lora_swiglu_tile(gu_ptr, a_ptr, b_ptr, h_ptr, N, inter, R, t % tiles_m, t // tiles_m,
                          BLOCK_M, BLOCK_N, BLOCK_R, IEEE)


def lora_swiglu_(gu: torch.Tensor, a: torch.Tensor, B: torch.Tensor,
                 launch: EpilogueLaunch | None = None) -> torch.Tensor:
    """See fused_ops.lora_swiglu_: gu [N, 2I] in place, returns [N, I] in gu.dtype. `launch`:
    LORA_SWIGLU_LAUNCH unless given (the timing benchmark's variants)."""
    _check_2d("lora_swiglu_: gu", gu)
    if not (gu.shape[1] % 2 == 0):
        raise ValueError(f"lora_swiglu_: gu must have an even number of columns, got {gu.shape[1]}")
    N, inter = gu.shape[0], gu.shape[1] // 2
    R = _check_adapter("lora_swiglu_", gu, a, B, 2 * inter)
    h = _empty((N, inter), gu.dtype, gu.device)
    if not (N and inter):
        return h
    block_r, ieee = max(16, triton.next_power_of_2(R)), a.dtype == torch.float32

    def run(launch: EpilogueLaunch) -> None:
        tiles_m, tiles_n = triton.cdiv(N, launch.block_m), triton.cdiv(inter, launch.block_n)
        shape = dict(BLOCK_M=launch.block_m, BLOCK_N=launch.block_n, BLOCK_R=block_r, IEEE=ieee,
                     num_warps=launch.warps)
        with _device_of(gu):
            if launch.programs_per_sm:
                programs = min(tiles_m * tiles_n, launch.programs_per_sm * _num_sms(gu.device))
                per_program = triton.cdiv(tiles_m * tiles_n, programs)
                _lora_swiglu_persistent_kernel[(programs,)](gu, a, B, h, N, inter, R, per_program,
                                                            STAGES=launch.stages, **shape)
            else:
                _lora_swiglu_kernel[(tiles_m, tiles_n)](gu, a, B, h, N, inter, R, **shape)

    if launch is not None:  # a variant asked for by name (the timing benchmark): that one or its error
        run(launch)
    else:
        key = (block_r, ieee, gu.dtype, a.dtype, B.dtype, gu.device)
        _first_fitting_launch("lora_swiglu_", key, (LORA_SWIGLU_LAUNCH, *LORA_SWIGLU_FALLBACKS), run)
    return h


@triton.jit(do_not_specialize=['N'])
def _lora_residual_add_kernel(x_ptr, y_ptr, a_ptr, b_ptr, out_ptr, N, H, R, BLOCK_M: tl.constexpr,
                              BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, IEEE: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rr = tl.arange(0, BLOCK_R)
    row_in, col_in, r_in = rows < N, cols < H, rr < R
    rows64 = rows.to(tl.int64)
    inside = row_in[:, None] & col_in[None, :]
    offs = rows64[:, None] * H + cols[None, :]
    y = tl.load(y_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    at = tl.load(a_ptr + rows64[:, None] * R + rr[None, :], mask=row_in[:, None] & r_in[None, :], other=0.0)
    bt = tl.load(b_ptr + cols.to(tl.int64)[None, :] * R + rr[:, None], mask=r_in[:, None] & col_in[None, :], other=0.0)
    y = _dot(at, bt, y, IEEE)
    x = tl.load(x_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, (x + y).to(out_ptr.dtype.element_ty), mask=inside)


def lora_residual_add(x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, B: torch.Tensor,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """See fused_ops.lora_residual_add: x + (y + a @ B^T) in x.dtype (into `out` when given)."""
    _check_2d("lora_residual_add: x", x)
    _check_2d("lora_residual_add: y", y)
    if not (y.shape == x.shape):
        raise ValueError(f"lora_residual_add: y {tuple(y.shape)} and x {tuple(x.shape)} differ in shape")
    N, H = x.shape
    R = _check_adapter("lora_residual_add", x, a, B, H)
    _check_same_device(x=x, y=y)
    out = _out("lora_residual_add", out, x) if out is not None else _empty((N, H), x.dtype, x.device)
    if N and H:
        block_m, block_n = 64, 64
        with _device_of(x):
            _lora_residual_add_kernel[(triton.cdiv(N, block_m), triton.cdiv(H, block_n))](
                x, y, a, B, out, N, H, R, BLOCK_M=block_m, BLOCK_N=block_n,
                BLOCK_R=max(16, triton.next_power_of_2(R)), IEEE=a.dtype == torch.float32, num_warps=4)
    return out


# ---------------------------------------------------------------------------------------------
# SwiGLU on the fused gate|up output: one program per (token, block of I columns)

_SWIGLU_BLOCK = 1024


@triton.jit
def _swiglu_kernel(gu_ptr, h_ptr, inter, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = cols < inter
    gu_row = gu_ptr + row * (2 * inter)
    g = tl.load(gu_row + cols, mask=inside, other=0.0).to(tl.float32)
    u = tl.load(gu_row + inter + cols, mask=inside, other=0.0).to(tl.float32)
    h = g * tl.sigmoid(g) * u
    tl.store(h_ptr + row * inter + cols, h.to(h_ptr.dtype.element_ty), mask=inside)


def swiglu(gu: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """gu [N, 2I] (gate in the first I columns, up in the last I) -> silu(gate) * up [N, I] in
    out_dtype (default gu's)."""
    _check_2d("swiglu: gu", gu)
    if not (gu.shape[1] % 2 == 0):
        raise ValueError(f"swiglu: gu must have an even number of columns, got {gu.shape[1]}")
    N, inter = gu.shape[0], gu.shape[1] // 2
    h = _empty((N, inter), out_dtype or gu.dtype, gu.device)
    if N and inter:
        block = min(_SWIGLU_BLOCK, triton.next_power_of_2(inter))
        with _device_of(gu):
            _swiglu_kernel[(N, triton.cdiv(inter, block))](gu, h, inter, BLOCK=block, num_warps=4)
    return h


@triton.jit
def _swiglu_backward_kernel(gh_ptr, gu_ptr, d_ptr, inter, BLOCK: tl.constexpr, FORWARD: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = cols < inter
    gu_row = gu_ptr + row * (2 * inter)
    d_row = d_ptr + row * (2 * inter)
    g = tl.load(gu_row + cols, mask=inside, other=0.0).to(tl.float32)
    u = tl.load(gu_row + inter + cols, mask=inside, other=0.0).to(tl.float32)
    gh = tl.load(gh_ptr + row * inter + cols, mask=inside, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    d_up = gh * g * s
    d_gate = gh * u * s * (1.0 + g * (1.0 - s))
    out_ty = d_ptr.dtype.element_ty
    tl.store(d_row + cols, d_gate.to(out_ty), mask=inside)
    tl.store(d_row + inter + cols, d_up.to(out_ty), mask=inside)
    if FORWARD:  # over gh: _swiglu_kernel's output, the same products in the same order
        h = g * s * u
        tl.debug_barrier()  # every thread's load of gh is done before any of them writes over it
        tl.store(gh_ptr + row * inter + cols, h.to(gh_ptr.dtype.element_ty), mask=inside)


def swiglu_backward(gh: torch.Tensor, gu: torch.Tensor, forward_into_gh: bool = False) -> torch.Tensor:
    """Gradient of swiglu: gh [N, I] -> [N, 2I] (d gate | d up), in gu.dtype; forward_into_gh:
    gh then holds swiglu(gu, gh.dtype) bit for bit, each element written once the kernel has read it."""
    _check_2d("swiglu_backward: gu", gu)
    _check_2d("swiglu_backward: gh", gh)
    if not (gu.shape[1] % 2 == 0):
        raise ValueError(f"swiglu_backward: gu must have an even number of columns, got {gu.shape[1]}")
    N, inter = gu.shape[0], gu.shape[1] // 2
    if not (tuple(gh.shape) == (N, inter)):
        raise ValueError(f"swiglu_backward: gh must be [{N}, {inter}], got {tuple(gh.shape)}")
    _check_same_device(gh=gh, gu=gu)
    d = _empty((N, 2 * inter), gu.dtype, gu.device)
    if N and inter:
        block = min(_SWIGLU_BLOCK, triton.next_power_of_2(inter))
        with _device_of(gu):
            _swiglu_backward_kernel[(N, triton.cdiv(inter, block))](gh, gu, d, inter, BLOCK=block,
                                                                    FORWARD=bool(forward_into_gh), num_warps=4)
    return d


# ---------------------------------------------------------------------------------------------
# The LoRA A side with dropout. r is padded to a power of two >= 16 (tl.dot's smallest side).


def _block_r(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


def _check_lora_pair(name: str, x: torch.Tensor, other: torch.Tensor, other_name: str, dim: int, what: str) -> None:
    """x and the other operand of a LoRA A-side kernel: 2-D, one dot dtype, one device, and the
    same size in x's dimension `dim` (H or N, named by `what`) and the other's matching one."""
    _check_2d(f"{name}: x", x, _DOT_DTYPES)
    _check_2d(f"{name}: {other_name}", other, _DOT_DTYPES)
    if not (other.dtype == x.dtype):
        raise ValueError(f"{name}: {other_name} ({other.dtype}) and x ({x.dtype}) must have one dtype")
    if not (other.shape[dim] == x.shape[dim]):
        raise ValueError(f"{name}: {other_name} {tuple(other.shape)} and x {tuple(x.shape)} differ in {what}")
    _check_same_device(x=x, **{other_name: other})


def _lora_shapes(name: str, x: torch.Tensor, rows_of_a: int, n: int) -> int:
    if not (isinstance(n, int) and n >= 1):
        raise ValueError(f"{name}: n must be a positive int, got {n!r}")
    if not (rows_of_a % n == 0 and rows_of_a > 0):
        raise ValueError(f"{name}: the LoRA rank dimension ({rows_of_a}) must be n * r with n={n}")
    r = rows_of_a // n
    if not (r <= 256):
        raise ValueError(f"{name}: r up to 256 is supported, got {r}")
    return r


@triton.jit
def _lora_a_step(acc, xt, a_ptr, seed, j, rows, cols, col_in, rr, r_in, H, r, p, IEEE: tl.constexpr,
                 TRANSPOSED: tl.constexpr):
    """acc + projection j's masked x tile times its A tile: [M, R] += (x*mask) @ A_j^T, or with
    TRANSPOSED the same product transposed, [R, M] += A_j @ (x*mask)^T (A_j's tile a plain
    row-major load, and a dot 16 rows tall like lora_a_backward's)."""
    keep = _keep(seed, j, rows[:, None], cols[None, :], H, p)
    xm = tl.where(keep, xt, tl.zeros_like(xt))
    a_rows = (j * r + rr).to(tl.int64)
    if TRANSPOSED:
        at = tl.load(a_ptr + a_rows[:, None] * H + cols[None, :], mask=r_in[:, None] & col_in[None, :], other=0.0)
        return _dot(at, tl.trans(xm), acc, IEEE)
    else:
        at = tl.load(a_ptr + a_rows[None, :] * H + cols[:, None], mask=col_in[:, None] & r_in[None, :], other=0.0)
        return _dot(xm, at, acc, IEEE)


@triton.jit
def _lora_a_store(out_ptr, acc, split, N, n, r, j, rows, row_in, rr, r_in, TRANSPOSED: tl.constexpr):
    base = out_ptr + split.to(tl.int64) * N * (n * r)
    if TRANSPOSED:  # acc is [R, M]
        ptrs = base + rows.to(tl.int64)[None, :] * (n * r) + (j * r + rr)[:, None]
        tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=r_in[:, None] & row_in[None, :])
    else:
        ptrs = base + rows.to(tl.int64)[:, None] * (n * r) + (j * r + rr)[None, :]
        tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_in[:, None] & r_in[None, :])


@triton.jit(do_not_specialize=['N', 'n_mblocks', 'kblocks_per_split'])
def _lora_a_kernel(x_ptr, a_ptr, out_ptr, N, H, r, n, n_mblocks, kblocks_per_split, seed_ptr, p,
                   BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, IEEE: tl.constexpr,
                   NPROJ: tl.constexpr, TRANSPOSED: tl.constexpr):
    seed = tl.load(seed_ptr)
    # Flat grid over (split of H, token block, group of NPROJ projections), the group fastest: the
    # programs of one token block run together and share x in L2. A program reads each x tile
    # once for its NPROJ (1 to 3) projections, one mask and one dot each. Split s writes its fp32
    # partial sums to plane s of out.
    pid = tl.program_id(0)
    groups = n // NPROJ
    j0 = (pid % groups) * NPROJ
    mblock = (pid // groups) % n_mblocks
    split = pid // (groups * n_mblocks)
    rows = mblock * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = tl.arange(0, BLOCK_R)
    row_in = rows < N
    r_in = rr < r
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * H
    if TRANSPOSED:
        acc0 = tl.zeros((BLOCK_R, BLOCK_M), dtype=tl.float32)
    else:
        acc0 = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    acc1 = acc0
    acc2 = acc0
    # The split's first column as a multiple of the constexpr BLOCK_K, so the compiler knows every
    # x tile starts 16-byte aligned and loads it in 16-byte vectors (cp.async). Passed as a column
    # count, its alignment was unknown and each element took its own 2-byte load (session 12).
    k_start = split * kblocks_per_split * BLOCK_K
    k_end = tl.minimum(k_start + kblocks_per_split * BLOCK_K, H)
    for k0 in range(k_start, k_end, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_in = cols < k_end
        xt = tl.load(x_rows + cols[None, :], mask=row_in[:, None] & col_in[None, :], other=0.0)
        acc0 = _lora_a_step(acc0, xt, a_ptr, seed, j0, rows, cols, col_in, rr, r_in, H, r, p, IEEE, TRANSPOSED)
        if NPROJ > 1:
            acc1 = _lora_a_step(acc1, xt, a_ptr, seed, j0 + 1, rows, cols, col_in, rr, r_in, H, r, p, IEEE,
                                TRANSPOSED)
        if NPROJ > 2:
            acc2 = _lora_a_step(acc2, xt, a_ptr, seed, j0 + 2, rows, cols, col_in, rr, r_in, H, r, p, IEEE,
                                TRANSPOSED)
    _lora_a_store(out_ptr, acc0, split, N, n, r, j0, rows, row_in, rr, r_in, TRANSPOSED)
    if NPROJ > 1:
        _lora_a_store(out_ptr, acc1, split, N, n, r, j0 + 1, rows, row_in, rr, r_in, TRANSPOSED)
    if NPROJ > 2:
        _lora_a_store(out_ptr, acc2, split, N, n, r, j0 + 2, rows, row_in, rr, r_in, TRANSPOSED)


@triton.jit
def _sum_planes_kernel(parts_ptr, out_ptr, n_planes, plane, BLOCK: tl.constexpr):
    """out = parts[0] + parts[1] + ... in fp32, in that order, rounded once to out's dtype."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < plane
    acc = tl.load(parts_ptr + offs, mask=inside, other=0.0)
    for s in range(1, n_planes):
        acc += tl.load(parts_ptr + s * plane + offs, mask=inside, other=0.0)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=inside)


def _sum_planes(parts: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[S, ...] fp32 partial sums -> their in-order fp32 sum in `dtype`: one kernel where
    sum(0) then .to(dtype) took two (and a fp32 temporary)."""
    out = _empty(parts.shape[1:], dtype, parts.device)
    plane = out.numel()
    if plane:
        block = 1024
        with _device_of(parts):
            _sum_planes_kernel[(triton.cdiv(plane, block),)](parts, out, parts.shape[0], plane, BLOCK=block,
                                                             num_warps=4)
    return out


# lora_a's programs per SM: the same shape as lora_a_backward's grid, which makes the same Philox
# draws over the same reads of x. At about 2 per SM (session 9) each program walked twice the K
# steps of a backward program with half the warps in flight to hide the draws' latency, and the
# forward took 2.7x the backward's time (benchmarks/NOTES.md, "Session 9 profile").
_LORA_A_PROGRAMS_PER_SM = 4


@dataclasses.dataclass(frozen=True)
class LoraAConfig:
    """How lora_a launches its kernel (benchmarks/lora_a_timing.py sweeps these): token rows and
    H columns per tile, warps and pipeline stages, programs per SM that the default split aims at,
    projections per program (1, or all n when n <= 3: each x tile read and held once), and the
    dot's orientation (transposed: [R, M] = A_j @ (x*mask)^T)."""
    block_m: int = 64
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 3
    programs_per_sm: int = _LORA_A_PROGRAMS_PER_SM
    all_n: bool = False
    transposed: bool = False


LORA_A_CONFIG = LoraAConfig()


def lora_a(x: torch.Tensor, A: torch.Tensor, seed: int, p: float, n: int, *,
           splits: int | None = None, config: LoraAConfig | None = None) -> torch.Tensor:
    """x [N, H], A [n*r, H] -> [N, n*r] in x.dtype: block j is (x * mask_j) @ A_j^T.

    The token blocks alone are too few to fill the GPU (and each would walk all of H: 18,944
    columns for a 7B down_proj), so H is cut into `splits` ranges (default: about
    config.programs_per_sm programs per SM) whose fp32 partial sums are added in a fixed order
    by one more kernel, so the result does not depend on scheduling."""
    _check_lora_pair("lora_a", x, A, "A", 1, "H")
    N, H = x.shape
    r = _lora_shapes("lora_a", x, A.shape[0], n)
    seed = _check_dropout(seed, p, n, N, H, x.device)
    if N == 0:
        return _empty((N, n * r), x.dtype, x.device)
    cfg = config or LORA_A_CONFIG
    block_r = _block_r(r)
    block_m = cfg.block_m
    block_k = cfg.block_k if block_r <= 64 else min(cfg.block_k, 32)
    nproj = n if cfg.all_n and n <= 3 else 1
    n_mblocks = triton.cdiv(N, block_m)
    k_blocks = triton.cdiv(H, block_k)
    if splits is None:
        splits = triton.cdiv(cfg.programs_per_sm * _num_sms(x.device), (n // nproj) * n_mblocks)
    splits = max(1, min(int(splits), triton.cdiv(k_blocks, 2)))  # at least 2 K steps per split
    kblocks_per_split = triton.cdiv(k_blocks, splits)
    splits = triton.cdiv(k_blocks, kblocks_per_split)
    out = _empty((splits, N, n * r), torch.float32, x.device)  # fp32 partial sums (one kernel variant)
    grid = ((n // nproj) * n_mblocks * splits,)
    with _device_of(x):
        _lora_a_kernel[grid](x, A, out, N, H, r, n, n_mblocks, kblocks_per_split, seed, float(p), BLOCK_M=block_m,
                             BLOCK_K=block_k, BLOCK_R=block_r, IEEE=x.dtype == torch.float32, NPROJ=nproj,
                             TRANSPOSED=cfg.transposed, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if splits == 1:
        return out[0] if x.dtype == torch.float32 else out[0].to(x.dtype)
    return _sum_planes(out, x.dtype)


def _token_split(N: int, block_m: int, splits: int | None, programs_per_sm: int, device,
                 programs_per_split: int) -> tuple[int, int]:
    """(splits, tokens per split) for a kernel whose programs sum over ranges of N tokens: `splits`
    when given, else enough for programs_per_sm programs an SM at programs_per_split programs a
    split; whole tiles of block_m tokens per split, none of the splits empty."""
    token_blocks = triton.cdiv(N, block_m)
    if splits is None:
        splits = triton.cdiv(programs_per_sm * _num_sms(device), programs_per_split)
    splits = max(1, min(int(splits), token_blocks))
    rows_per_split = triton.cdiv(token_blocks, splits) * block_m
    return triton.cdiv(N, rows_per_split), rows_per_split


@dataclasses.dataclass(frozen=True)
class MaskedBackwardLaunch:
    """How lora_a_backward and lora_x_backward_ tile their work (benchmarks/lora_a_timing.py times
    these): token rows and columns per tile, warps, pipeline stages, and the programs per SM that
    lora_a_backward's token split aims at."""

    block_m: int
    block_h: int
    warps: int = 4
    stages: int = 3
    programs_per_sm: int = 4

    def __post_init__(self):
        tiles = (self.block_m, self.block_h)
        if not all(t >= 16 and t & (t - 1) == 0 for t in tiles):  # tl.dot's smallest side; the masks' groups of 8
            raise ValueError(f"MaskedBackwardLaunch: tiles must be powers of two >= 16, got {tiles}")
        if not (self.warps in (1, 2, 4, 8, 16) and self.stages >= 1 and self.programs_per_sm >= 1):
            raise ValueError(f"MaskedBackwardLaunch: warps {self.warps}, stages {self.stages} and programs per SM "
                             f"{self.programs_per_sm} must be a power of two <= 16, >= 1 and >= 1")


# The fastest of benchmarks/lora_a_timing.py's launches on the H200 at every row (session 12,
# results/lora_a_timing_session12_h200.md): 8 programs an SM for the A gradient's token split
# (-0.2 / -0.6 / -0.9 ms a step at 8B / 7B / 1.5B), 32-token tiles for the input gradient
# (-0.9 / -1.0 / -1.9 ms; 64-token tiles held 255 registers a thread).
LORA_A_BACKWARD_LAUNCH = MaskedBackwardLaunch(block_m=64, block_h=64, warps=4, stages=3, programs_per_sm=8)
LORA_X_BACKWARD_LAUNCH = MaskedBackwardLaunch(block_m=32, block_h=128, warps=4, stages=2)


@triton.jit(do_not_specialize=['N', 'rows_per_split'])
def _lora_a_backward_kernel(ga_ptr, x_ptr, out_ptr, N, H, r, n, n_hblocks, rows_per_split, seed_ptr, p,
                            BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr,
                            IEEE: tl.constexpr):
    seed = tl.load(seed_ptr)
    # Flat grid over (split of N, block of H, j), j fastest then H: neighbours share x tiles in L2.
    pid = tl.program_id(0)
    j = pid % n
    rest = pid // n
    cols = (rest % n_hblocks) * BLOCK_H + tl.arange(0, BLOCK_H)
    start = (rest // n_hblocks) * rows_per_split
    rr = tl.arange(0, BLOCK_R)
    col_in = cols < H
    r_in = rr < r
    acc = tl.zeros((BLOCK_R, BLOCK_H), dtype=tl.float32)
    for t0 in range(0, rows_per_split, BLOCK_N):
        rows = start + t0 + tl.arange(0, BLOCK_N)
        row_in = rows < N
        rows64 = rows.to(tl.int64)
        ga = tl.load(ga_ptr + rows64[:, None] * (n * r) + (j * r + rr)[None, :],
                     mask=row_in[:, None] & r_in[None, :], other=0.0)  # [T, R]
        xt = tl.load(x_ptr + rows64[:, None] * H + cols[None, :], mask=row_in[:, None] & col_in[None, :], other=0.0)
        keep = _keep(seed, j, rows[:, None], cols[None, :], H, p)
        xt = tl.where(keep, xt, tl.zeros_like(xt))
        acc = _dot(tl.trans(ga), xt, acc, IEEE)
    out = out_ptr + (j * r + rr).to(tl.int64)[:, None] * H + cols[None, :]
    tl.atomic_add(out, acc, mask=r_in[:, None] & col_in[None, :], sem="relaxed")


def lora_a_backward(ga: torch.Tensor, x: torch.Tensor, seed: int, p: float, n: int, *,
                    splits: int | None = None, out: torch.Tensor | None = None, out_zeroed: bool = False,
                    launch: MaskedBackwardLaunch | None = None) -> torch.Tensor:
    """The gradient of lora_a with respect to A: [n*r, H] fp32, block j = ga_j^T @ (x * mask_j).

    The token dimension is cut into `splits` ranges (default: enough for the launch's programs per SM)
    whose partial sums meet in the output by fp32 atomic adds, so the summation order, and with
    it the last bits of the result, can vary from run to run when there is more than one split."""
    _check_lora_pair("lora_a_backward", x, ga, "ga", 0, "N")
    N, H = x.shape
    r = _lora_shapes("lora_a_backward", x, ga.shape[1], n)
    seed = _check_dropout(seed, p, n, N, H, x.device)
    if out is None:
        out = torch.zeros((n * r, H), dtype=torch.float32, device=x.device)
    else:  # the partial sums meet there by atomic adds: it starts from zero, as the fresh buffer
        if not (out.dtype == torch.float32 and out.is_contiguous() and out.shape == (n * r, H)):
            raise ValueError(f"lora_a_backward: out must be contiguous fp32 {(n * r, H)}, got {out.dtype} "
                             f"{tuple(out.shape)}")
        if not out_zeroed:  # else the caller zeroed it (fused_ops.lora_a_backward)
            out.zero_()
    if N == 0 or H == 0:
        return out
    launch = LORA_A_BACKWARD_LAUNCH if launch is None else launch
    block_n, block_h, block_r = launch.block_m, launch.block_h, _block_r(r)
    n_hblocks = triton.cdiv(H, block_h)
    splits, rows_per_split = _token_split(N, block_n, splits, launch.programs_per_sm, x.device, n * n_hblocks)
    grid = (n * n_hblocks * splits,)
    with _device_of(x):
        _lora_a_backward_kernel[grid](ga, x, out, N, H, r, n, n_hblocks, rows_per_split, seed, float(p),
                                      BLOCK_N=block_n, BLOCK_H=block_h, BLOCK_R=block_r,
                                      IEEE=x.dtype == torch.float32, num_warps=launch.warps,
                                      num_stages=launch.stages)
    return out


@triton.jit
def _lora_grads_accumulate_kernel(acc_ptr, a_ptr, b_ptr, scale_ptr, n_a, n, rank, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = i < n
    is_a = i < n_a
    is_b = inside & (i >= n_a)
    acc = tl.load(acc_ptr + i, mask=inside, other=0.0)
    ga = tl.load(a_ptr + i, mask=is_a, other=0.0)
    jb = tl.where(is_b, i - n_a, 0)
    gb = tl.load(b_ptr + jb, mask=is_b, other=0.0).to(tl.float32)
    s = tl.load(scale_ptr + jb // rank, mask=is_b, other=0.0)
    g = tl.where(is_a, ga, gb * s)  # rounded to fp32 before the add (no FMA: enable_fp_fusion=False)
    tl.store(acc_ptr + i, acc + g, mask=inside)


def lora_grads_accumulate_(acc: torch.Tensor, src_a: torch.Tensor, src_b: torch.Tensor,
                           row_scale: torch.Tensor, rank: int) -> None:
    """fused_ops.lora_grads_accumulate_ in one launch: acc[:nA] += src_a, acc[nA:] += float(src_b)
    * row_scale[row], with the multiplication rounded on its own (the cast, the scaling and the
    multi-tensor add it replaces, bit for bit)."""
    n_a, n = src_a.numel(), acc.numel()
    if not (acc.dtype == src_a.dtype == row_scale.dtype == torch.float32 and n == n_a + src_b.numel()
            and src_b.numel() == row_scale.numel() * rank
            and all(t.is_contiguous() for t in (acc, src_a, src_b, row_scale))):
        raise ValueError("lora_grads_accumulate_: contiguous fp32 acc [nA + nB], src_a [nA] fp32, src_b [nB], "
                         f"row_scale [nB / rank] fp32; got {acc.shape} {src_a.shape} {src_b.shape} {row_scale.shape}")
    if n == 0:
        return
    block = 2048
    with _device_of(acc):
        _lora_grads_accumulate_kernel[(triton.cdiv(n, block),)](acc, src_a, src_b, row_scale, n_a, n, rank,
                                                                 BLOCK=block, num_warps=8, enable_fp_fusion=False)


@triton.jit
def _lora_factors_kernel(a0, a1, a2, b0, b1, b2, A_ptr, B_ptr, scale_ptr, in_f, out0, out1, out2,
                         R: tl.constexpr, N_PROJ: tl.constexpr, BLOCK: tl.constexpr):
    """One LoRA set's static factors from its parameters: program (chunk, j, part) writes chunk of
    projection j's A rows (part 0: cast) or of its scaled B block (part 1: B[row_j + i, j*R + k] =
    b_j[i, k] * scale_j, rounded once)."""
    chunk = tl.program_id(0)
    j = tl.program_id(1)
    part = tl.program_id(2)
    e = chunk.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    out_ty = A_ptr.dtype.element_ty
    if part == 0:
        if j == 0:
            src = a0
        elif j == 1:
            src = a1
        else:
            src = a2
        count = R * in_f
        inside = e < count
        v = tl.load(src + e, mask=inside, other=0.0)
        tl.store(A_ptr + j * count + e, v.to(out_ty, fp_downcast_rounding="rtne"), mask=inside)
    else:
        if j == 0:
            src, rows, first = b0, out0, out0 * 0
        elif j == 1:
            src, rows, first = b1, out1, out0
        else:
            src, rows, first = b2, out2, out0 + out1
        inside = e < rows * R
        v = tl.load(src + e, mask=inside, other=0.0) * tl.load(scale_ptr + j)
        i, k = e // R, e % R
        tl.store(B_ptr + (first + i) * (N_PROJ * R) + j * R + k, v.to(out_ty, fp_downcast_rounding="rtne"), mask=inside)


def lora_factors_(A: torch.Tensor, B: torch.Tensor, As: list, Bs: list, scales: torch.Tensor) -> None:
    """fused_ops.lora_factors_ in one launch: A [n*r, in] <- cat(As) cast, B's diagonal blocks
    [out_j, r] <- Bs[j] * scales[j] rounded once (the zeros around them stay)."""
    n = len(As)
    r, in_f = As[0].shape
    if not (1 <= n <= 3 and len(Bs) == n and scales.numel() == n and scales.dtype == torch.float32
            and all(t.dtype == torch.float32 and t.is_contiguous() for t in (*As, *Bs))
            and A.is_contiguous() and B.is_contiguous() and tuple(A.shape) == (n * r, in_f)
            and tuple(B.shape) == (sum(b.shape[0] for b in Bs), n * r)
            and all(tuple(a.shape) == (r, in_f) for a in As) and all(b.shape[1] == r for b in Bs)):
        raise ValueError("lora_factors_: n <= 3 contiguous fp32 A_j [r, in] and B_j [out_j, r], fp32 scales [n], "
                         f"A [n*r, in], B [sum out_j, n*r]; got A {tuple(A.shape)}, B {tuple(B.shape)}, "
                         f"As {[tuple(a.shape) for a in As]}, Bs {[tuple(b.shape) for b in Bs]}")
    outs = [b.shape[0] for b in Bs] + [0] * (3 - n)
    pad_a, pad_b = [*As, *[As[0]] * (3 - n)], [*Bs, *[Bs[0]] * (3 - n)]
    block = 4096
    chunks = triton.cdiv(max(r * in_f, max(outs) * r), block)
    with _device_of(A):
        _lora_factors_kernel[(chunks, n, 2)](*pad_a, *pad_b, A, B, scales, in_f, *outs, R=r, N_PROJ=n, BLOCK=block,
                                              num_warps=4, enable_fp_fusion=False)


@triton.jit(do_not_specialize=['N'])
def _lora_x_backward_kernel(gx_ptr, ga_ptr, a_ptr, N, H, r, n, n_hblocks, seed_ptr, p,
                            BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr,
                            IEEE: tl.constexpr):
    seed = tl.load(seed_ptr)
    pid = tl.program_id(0)
    cols = (pid % n_hblocks) * BLOCK_H + tl.arange(0, BLOCK_H)
    rows = (pid // n_hblocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = tl.arange(0, BLOCK_R)
    row_in = rows < N
    col_in = cols < H
    r_in = rr < r
    rows64 = rows.to(tl.int64)
    total = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
    for j in range(0, n):
        ga = tl.load(ga_ptr + rows64[:, None] * (n * r) + (j * r + rr)[None, :],
                     mask=row_in[:, None] & r_in[None, :], other=0.0)  # [M, R]
        a = tl.load(a_ptr + (j * r + rr).to(tl.int64)[:, None] * H + cols[None, :],
                    mask=r_in[:, None] & col_in[None, :], other=0.0)  # [R, H]
        part = _dot(ga, a, tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32), IEEE)
        keep = _keep(seed, j, rows[:, None], cols[None, :], H, p)
        total += tl.where(keep, part, 0.0)
    inside = row_in[:, None] & col_in[None, :]
    ptrs = gx_ptr + rows64[:, None] * H + cols[None, :]
    gx = tl.load(ptrs, mask=inside, other=0.0).to(tl.float32)
    tl.store(ptrs, (gx + total).to(gx_ptr.dtype.element_ty), mask=inside)


def lora_x_backward_(gx: torch.Tensor, ga: torch.Tensor, A: torch.Tensor, seed: int, p: float, n: int, *,
                     launch: MaskedBackwardLaunch | None = None) -> None:
    """In place: gx += sum_j (ga_j @ A_j) * mask_j, the input gradient of lora_a (fp32 sums, one
    rounding to gx.dtype)."""
    _check_2d("lora_x_backward_: gx", gx)
    _check_2d("lora_x_backward_: ga", ga, _DOT_DTYPES)
    _check_2d("lora_x_backward_: A", A, _DOT_DTYPES)
    if not (ga.dtype == A.dtype):
        raise ValueError(f"lora_x_backward_: ga ({ga.dtype}) and A ({A.dtype}) must have one dtype")
    if not (A.shape[1] == gx.shape[1]):
        raise ValueError(f"lora_x_backward_: A {tuple(A.shape)} does not match gx {tuple(gx.shape)} in H")
    if not (ga.shape[0] == gx.shape[0] and ga.shape[1] == A.shape[0]):
        raise ValueError(f"lora_x_backward_: ga {tuple(ga.shape)} must be [{gx.shape[0]}, {A.shape[0]}]")
    _check_same_device(gx=gx, ga=ga, A=A)
    N, H = gx.shape
    r = _lora_shapes("lora_x_backward_", gx, A.shape[0], n)
    seed = _check_dropout(seed, p, n, gx.shape[0], H, gx.device)
    if N == 0 or H == 0:
        return
    launch = LORA_X_BACKWARD_LAUNCH if launch is None else launch
    block_m, block_h, block_r = launch.block_m, launch.block_h, _block_r(r)
    n_hblocks = triton.cdiv(H, block_h)
    grid = (n_hblocks * triton.cdiv(N, block_m),)
    with _device_of(gx):
        _lora_x_backward_kernel[grid](gx, ga, A, N, H, r, n, n_hblocks, seed, float(p),
                                      BLOCK_M=block_m, BLOCK_H=block_h, BLOCK_R=block_r,
                                      IEEE=ga.dtype == torch.float32, num_warps=launch.warps,
                                      num_stages=launch.stages)


@triton.jit(do_not_specialize=['N', 'rows_per_split'])
def _lora_b_grads_kernel(g_ptr, a_ptr, b_ptr, ga_ptr, gb_ptr, N, W, R, r, end0, end1, n_cblocks, rows_per_split,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, IEEE: tl.constexpr):
    # Flat grid over (token split, block of W's columns), the column block fastest. A column block
    # lies in one projection j (BLOCK_N divides every projection's rows): it reads g's tiles once
    # for both gradients, B_j's rows once, a_j's columns once a tile. gB's rows sum over the
    # split's tokens in registers; ga's columns of j sum over the column blocks: fp32 atomic adds
    # into buffers the launcher zeroed (so the summation order, and the last bits, can vary).
    pid = tl.program_id(0)
    cb = pid % n_cblocks
    start = (pid // n_cblocks) * rows_per_split
    col0 = cb * BLOCK_N
    j = (col0 >= end0).to(tl.int32) + (col0 >= end1).to(tl.int32)
    cols = col0 + tl.arange(0, BLOCK_N)
    rr = tl.arange(0, BLOCK_R)
    col_in = cols < W
    r_in = rr < r
    cols64 = cols.to(tl.int64)
    bt = tl.load(b_ptr + cols64[:, None] * R + (j * r + rr)[None, :], mask=col_in[:, None] & r_in[None, :],
                 other=0.0)  # [BN, R]: B_j's block
    gb = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    for t0 in range(0, rows_per_split, BLOCK_M):
        rows = start + t0 + tl.arange(0, BLOCK_M)
        row_in = rows < N
        rows64 = rows.to(tl.int64)
        gt = tl.load(g_ptr + rows64[:, None] * W + cols64[None, :], mask=row_in[:, None] & col_in[None, :],
                     other=0.0)  # [BM, BN]
        at = tl.load(a_ptr + rows64[:, None] * R + (j * r + rr)[None, :], mask=row_in[:, None] & r_in[None, :],
                     other=0.0)  # [BM, R]
        ga = _dot(gt, bt, tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32), IEEE)
        tl.atomic_add(ga_ptr + rows64[:, None] * R + (j * r + rr)[None, :], ga, mask=row_in[:, None] & r_in[None, :],
                      sem="relaxed")
        gb = _dot(tl.trans(gt), at, gb, IEEE)
    tl.atomic_add(gb_ptr + cols64[:, None] * r + rr[None, :], gb, mask=col_in[:, None] & r_in[None, :], sem="relaxed")


@dataclasses.dataclass(frozen=True)
class LoraBGradsLaunch:
    """How lora_b_grads tiles g: token rows and columns (BLOCK_N must divide every projection's
    rows), warps, stages, and the programs per SM that its token split aims at."""

    block_m: int = 64
    block_n: int = 128
    warps: int = 4
    stages: int = 3
    programs_per_sm: int = 4


LORA_B_GRADS_LAUNCH = LoraBGradsLaunch()


def lora_b_grads_fits(rows: list[int], launch: LoraBGradsLaunch | None = None) -> bool:
    """Whether the kernel takes these projections: up to 3, each a whole number of column blocks."""
    block_n = (launch or LORA_B_GRADS_LAUNCH).block_n
    return 1 <= len(rows) <= 3 and all(n > 0 and n % block_n == 0 for n in rows)


def lora_b_grads(g: torch.Tensor, a: torch.Tensor, B: torch.Tensor, rows: list[int], *,
                 out: torch.Tensor | None = None, out_zeroed: bool = False, splits: int | None = None,
                 launch: LoraBGradsLaunch | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """See fused_ops.lora_b_grads: (ga [N, n*r] in g's dtype, gB [W, r] fp32, into `out` when given)
    from one read of g; ga's fp32 sums are rounded by one more small kernel (_sum_planes of one
    plane): when the masked A-side kernels read ga as fp32 instead, an 8B step took 1.7 ms longer
    (benchmarks/results/speed_profile_8b_session14_h200.md)."""
    _check_2d("lora_b_grads: g", g, _DOT_DTYPES)
    _check_2d("lora_b_grads: a", a, _DOT_DTYPES)
    _check_2d("lora_b_grads: B", B, _DOT_DTYPES)
    if not (a.dtype == B.dtype == g.dtype):
        raise ValueError(f"lora_b_grads: g ({g.dtype}), a ({a.dtype}) and B ({B.dtype}) must have one dtype")
    N, W = g.shape
    n = len(rows)
    if not (sum(rows) == W and B.shape[0] == W and a.shape[0] == N and a.shape[1] == B.shape[1]
            and a.shape[1] % max(n, 1) == 0):
        raise ValueError(f"lora_b_grads: g {tuple(g.shape)}, a {tuple(a.shape)}, B {tuple(B.shape)} and rows {rows} "
                         "must be g [N, W], a [N, n*r], B [W, n*r] with the rows summing to W")
    launch = LORA_B_GRADS_LAUNCH if launch is None else launch
    if not lora_b_grads_fits(rows, launch):
        raise ValueError(f"lora_b_grads: up to 3 projections, each a multiple of {launch.block_n} rows, got {rows}")
    _check_same_device(g=g, a=a, B=B)
    R = a.shape[1]
    r = R // n
    if not (r <= 256):
        raise ValueError(f"lora_b_grads: r up to 256 is supported, got {r}")
    ga = torch.zeros((N, R), dtype=torch.float32, device=g.device)
    if out is None:
        out = torch.zeros((W, r), dtype=torch.float32, device=g.device)
    else:  # the partial sums meet there by atomic adds: it starts from zero
        if not (out.dtype == torch.float32 and out.is_contiguous() and out.shape == (W, r)):
            raise ValueError(f"lora_b_grads: out must be contiguous fp32 {(W, r)}, got {out.dtype} {tuple(out.shape)}")
        if not out_zeroed:  # else the caller zeroed it (fused_ops.lora_b_grads)
            out.zero_()
    if N == 0:
        return ga.to(g.dtype), out
    n_cblocks = W // launch.block_n
    splits, rows_per_split = _token_split(N, launch.block_m, splits, launch.programs_per_sm, g.device, n_cblocks)
    ends = [sum(rows[:k + 1]) for k in range(n)] + [W] * (3 - n)
    with _device_of(g):
        _lora_b_grads_kernel[(n_cblocks * splits,)](g, a, B, ga, out, N, W, R, r, ends[0], ends[1], n_cblocks,
                                                    rows_per_split, BLOCK_M=launch.block_m, BLOCK_N=launch.block_n,
                                                    BLOCK_R=_block_r(r), IEEE=g.dtype == torch.float32,
                                                    num_warps=launch.warps, num_stages=launch.stages)
    return (ga if g.dtype == torch.float32 else _sum_planes(ga[None], g.dtype)), out


# ---------------------------------------------------------------------------------------------
# NF4 dequantization (bitsandbytes' format): one launch per weight, the nested (double-quantized)
# absmax decoded in the same kernel. Same arithmetic as bitsandbytes' kernels, in the same order
# (absmax = code2[q] * absmax2 + offset, then code[nibble] * absmax, each rounded in fp32, no
# fused multiply-add), so the result is bit for bit bitsandbytes'; launched with fp fusion off.
#
# A program takes whole quantization blocks: a [ROWS, HALF] tile of packed bytes (HALF = blocksize
# / 2 bytes a block), so the absmax is decoded once a block (ROWS loads, not one gathered load per
# byte). Each thread loads 4 bytes at a time and writes their 8 values as one 16-byte store, in one
# register layout (no shared-memory round trip between load and store); the 16 codes are gathered
# with tl.gather (shared memory), not loaded through L1 twice a byte; the output is stored with the
# streaming hint. Tiles wholly inside the weight skip the masks (only the last program is partial).
# Measured on an H200 (benchmarks/dequant_timing.py, benchmarks/results/dequant_timing_h200.md):
# 3.85 TB/s at the 8B MLP shapes, against 3.3 for session 10's kernel and 4.1 for a torch copy.


@dataclasses.dataclass(frozen=True)
class _Nf4Launch:
    """How dequantize_nf4 launches (a private knob for benchmarks/dequant_timing.py's sweep; the
    default is the sweep's fastest). lookup: "code" gathers code[nibble] from the 16 codes
    (tl.gather) and multiplies by the block's absmax; "table" gathers each value from its block's 16
    products code * absmax, already rounded to the output dtype (2-D tl.gather: warp shuffles);
    "load" loads code[nibble] through L1 (session 10's lookup)."""

    bytes_per_program: int = 4096
    num_warps: int = 8
    lookup: str = "code"
    stream_out: bool = True  # the output stored with the streaming (evict-first) cache hint
    # bytes a thread loads at once (0: the compiler's choice, 16 bytes): 4 bytes make 8 outputs, one
    # 16-byte store, so the loaded bytes and the stored values share a layout (no shared-memory
    # round trip between them)
    vec_bytes: int = 4


_NF4_LOOKUPS = {"load": 0, "code": 1, "table": 2}


@triton.jit
def _dequantize_nf4_kernel(q_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, code_ptr, out_ptr, n_bytes,
                           skip_ptr, HALF: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr,
                           ROWS: tl.constexpr, LOOKUP: tl.constexpr, STREAM_OUT: tl.constexpr,
                           VEC: tl.constexpr, SKIP: tl.constexpr):
    if SKIP:  # the output already holds these values (turn_weights.py): the flag is set
        if tl.load(skip_ptr) != 0:
            return
    pid = tl.program_id(0).to(tl.int64)
    first = pid * (ROWS * HALF)  # this program's first byte (int64: a weight may pass 2**31 values)
    rows = pid * ROWS + tl.arange(0, ROWS)  # absmax blocks
    local = tl.arange(0, ROWS)[:, None] * HALF + tl.arange(0, HALF)[None, :]  # byte i: values 2i, 2i + 1
    local_out = tl.arange(0, ROWS)[:, None] * (2 * HALF) + tl.arange(0, 2 * HALF)[None, :]
    if VEC > 0:
        local = tl.max_contiguous(local, [1, VEC])
        local_out = tl.max_contiguous(local_out, [1, 2 * VEC])
    full = first + ROWS * HALF <= n_bytes
    if full:
        q = tl.load(q_ptr + first + local, eviction_policy="evict_first").to(tl.int32)
    else:
        q = tl.load(q_ptr + first + local, mask=local < n_bytes - first, other=0).to(tl.int32)
    row_in = rows * HALF < n_bytes
    if NESTED:
        aq = tl.load(absmax_ptr + rows, mask=row_in, other=0).to(tl.int32)
        am = tl.load(code2_ptr + aq) * tl.load(absmax2_ptr + rows // BLOCKSIZE2, mask=row_in, other=0.0)
        am = am + tl.load(offset_ptr)
    else:
        am = tl.load(absmax_ptr + rows, mask=row_in, other=0.0)
    if LOOKUP == 2:
        # code[j] * absmax is the same fp32 product whichever value needs it: 16 a block, not 64
        table = (tl.load(code_ptr + tl.arange(0, 16))[None, :] * am[:, None]).to(out_ptr.dtype.element_ty)
        hi = tl.gather(table, q >> 4, 1)
        lo = tl.gather(table, q & 15, 1)
        vals = tl.reshape(tl.join(hi, lo), (ROWS, 2 * HALF))
    else:
        if LOOKUP == 1:
            code = tl.load(code_ptr + tl.arange(0, 16))
            hi = tl.reshape(tl.gather(code, tl.reshape(q >> 4, (ROWS * HALF,)), 0), (ROWS, HALF))
            lo = tl.reshape(tl.gather(code, tl.reshape(q & 15, (ROWS * HALF,)), 0), (ROWS, HALF))
        else:
            hi = tl.load(code_ptr + (q >> 4))
            lo = tl.load(code_ptr + (q & 15))
        am = am[:, None]
        vals = tl.reshape(tl.join(hi * am, lo * am), (ROWS, 2 * HALF)).to(out_ptr.dtype.element_ty)
    dst = out_ptr + 2 * first + local_out
    if full:
        if STREAM_OUT:
            tl.store(dst, vals, cache_modifier=".cs")
        else:
            tl.store(dst, vals)
    else:
        tl.store(dst, vals, mask=local_out < 2 * (n_bytes - first))


def dequantize_nf4(q: torch.Tensor, state, out: torch.Tensor, *, skip: torch.Tensor | None = None,
                   _launch: _Nf4Launch | None = None) -> None:
    """Write bitsandbytes' dequantization of the packed NF4 weight `q` (its QuantState `state`)
    into `out` (contiguous, state.shape's element count, any float dtype). `skip`: a one-element
    int32 device tensor; when it reads nonzero as the kernel runs, `out` is left as it is (a CUDA
    graph replays the launch either way: turn_weights.py)."""
    if not (state.quant_type == "nf4" and q.dtype == torch.uint8 and out.is_contiguous()):
        raise ValueError(f"dequantize_nf4: an NF4 uint8 weight and a contiguous output, got {state.quant_type} "
                         f"{q.dtype}")
    n = out.numel()
    if not (n % 2 == 0 and q.numel() * 2 == n and state.blocksize % 2 == 0):
        raise ValueError(f"dequantize_nf4: {q.numel()} bytes cannot hold {n} values")
    half = state.blocksize // 2
    if half & (half - 1):
        raise ValueError(f"dequantize_nf4: blocksize {state.blocksize} is not a power of two")
    nested = bool(state.nested)
    if nested:
        s2 = state.state2
        absmax, code2, absmax2, offset, bs2 = state.absmax, s2.code, s2.absmax, state.offset, s2.blocksize
        if not (absmax.dtype == torch.uint8 and code2.dtype == absmax2.dtype == torch.float32):
            raise ValueError(f"dequantize_nf4: unexpected nested state {absmax.dtype} {code2.dtype} {absmax2.dtype}")
        offset = offset.to(device=q.device, dtype=torch.float32).reshape(1)
    else:
        absmax = state.absmax
        if absmax.dtype != torch.float32:
            raise ValueError(f"dequantize_nf4: absmax must be fp32, got {absmax.dtype}")
        code2 = absmax2 = offset = absmax
        bs2 = 1
    code = state.code.to(device=q.device, dtype=torch.float32)
    if code.numel() != 16:
        raise ValueError(f"dequantize_nf4: the NF4 code has 16 entries, got {code.numel()}")
    launch = _launch or _NF4_LAUNCH
    rows = max(1, launch.bytes_per_program // half)
    with _device_of(q):
        _dequantize_nf4_kernel[(triton.cdiv(n // 2, rows * half),)](
            q, absmax, code2, absmax2, offset, code, out, n // 2, q if skip is None else skip, HALF=half,
            BLOCKSIZE2=bs2, NESTED=nested, ROWS=rows, LOOKUP=_NF4_LOOKUPS[launch.lookup], STREAM_OUT=launch.stream_out,
            VEC=launch.vec_bytes, SKIP=skip is not None, num_warps=launch.num_warps, enable_fp_fusion=False)


_NF4_LAUNCH = _Nf4Launch()


# ---------------------------------------------------------------------------------------------
# Cross-entropy rows: one program per row, an online logsumexp pass and a gradient pass over the
# row (6 bytes per bf16 logit instead of the ~40 that the cast, logsumexp, exp, scatter, scale and
# cast-back passes of the torch reference move).

_CE_BLOCK = 4096


@triton.jit
def _cross_entropy_rows_kernel(logits_ptr, labels_ptr, loss_ptr, V, stride, scale,
                               WRITE_GRAD: tl.constexpr, BLOCK: tl.constexpr, SCALE_IN_MEMORY: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride
    label = tl.load(labels_ptr + row)
    valid = (label >= 0) & (label < V)  # -100, or an unchecked label outside the vocabulary: no loss
    safe = tl.where(valid, label, 0)
    m = tl.full([BLOCK], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK], dtype=tl.float32)
    for v0 in range(0, V, BLOCK):
        cols = v0 + tl.arange(0, BLOCK)
        x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, x)
        live = m_new != float("-inf")  # a lane that has seen no logit yet adds nothing
        s = tl.where(live, s * tl.exp(m - m_new) + tl.exp(x - m_new), 0.0)
        m = m_new
    top = tl.max(m, axis=0)
    lse = top + tl.log(tl.sum(tl.where(m != float("-inf"), s * tl.exp(m - top), 0.0), axis=0))
    target = tl.load(base + safe).to(tl.float32)
    tl.store(loss_ptr + row, tl.where(valid, lse - target, 0.0))
    if WRITE_GRAD:
        if SCALE_IN_MEMORY:  # a device scalar (fp32), read here rather than by the host
            coef = tl.where(valid, tl.load(scale), 0.0)
        else:
            coef = tl.where(valid, scale, 0.0)
        for v0 in range(0, V, BLOCK):
            cols = v0 + tl.arange(0, BLOCK)
            inside = cols < V
            x = tl.load(base + cols, mask=inside, other=0.0).to(tl.float32)
            p = tl.exp(x - lse)
            p = tl.where(cols == safe, p - 1.0, p) * coef
            tl.store(base + cols, p.to(logits_ptr.dtype.element_ty), mask=inside)


def cross_entropy_rows_(logits: torch.Tensor, labels: torch.Tensor, scale: float | torch.Tensor | None) -> torch.Tensor:
    """See fused_ops.cross_entropy_rows_. Labels must be -100 or in [0, V) (the caller checks); a
    tensor `scale` is a one-element fp32 tensor on the logits' device, read by the kernel."""
    _check_2d("cross_entropy_rows_: logits", logits)
    if not (logits.stride(1) == 1):
        raise ValueError("cross_entropy_rows_: logits rows must be contiguous")
    if not (labels.dim() == 1 and labels.shape[0] == logits.shape[0]):
        raise ValueError(f"cross_entropy_rows_: labels {tuple(labels.shape)} do not match logits "
                         f"{tuple(logits.shape)}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"cross_entropy_rows_: labels must be int64 or int32, got {labels.dtype}")
    _check_same_device(logits=logits, labels=labels)
    if isinstance(scale, torch.Tensor):
        if not (scale.numel() == 1 and scale.dtype == torch.float32):
            raise ValueError(f"cross_entropy_rows_: a tensor scale must be one fp32 value, got {tuple(scale.shape)} "
                             f"{scale.dtype}")
        _check_same_device(logits=logits, scale=scale)
    C, V = logits.shape
    loss = _empty((C,), torch.promote_types(logits.dtype, torch.float32), logits.device)
    if C and V:
        with _device_of(logits):
            in_memory = isinstance(scale, torch.Tensor)
            _cross_entropy_rows_kernel[(C,)](logits, labels, loss, V, logits.stride(0),
                                             scale if in_memory else (float(scale) if scale is not None else 0.0),
                                             WRITE_GRAD=scale is not None, BLOCK=min(_CE_BLOCK, triton.next_power_of_2(V)),
                                             SCALE_IN_MEMORY=in_memory, num_warps=8)
    return loss
