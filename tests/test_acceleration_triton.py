"""The Triton kernels (acceleration/triton_ops.py) compute what the torch references in
acceleration/fused_ops.py compute.

Without a GPU the kernels run in Triton's interpreter (numpy on the CPU), which is chosen by
TRITON_INTERPRET=1 before Triton is imported: so this module never imports Triton itself and runs
the comparisons in a child Python that reports JSON. With a CUDA GPU, the same comparisons also
run compiled, in bf16, against fp32 references on the CPU.

LoRA dropout: the kernels' mask is Philox, not torch's generator, so the references are given the
kernels' own mask (triton_ops.dropout_mask) in place of fused_ops.dropout_mask.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

TRAINER_DIR = Path(__file__).resolve().parents[1] / "trainer_image"

# The child: argv[1] is "interpret" (fp32 CPU tensors, Triton's interpreter) or "cuda" (bf16).
SCRIPT = r'''
import json
import os
import sys

MODE = sys.argv[1]
INTERPRET = MODE == "interpret"

if INTERPRET:
    from qlora_trainer.acceleration.triton_interpreter import allow_scalar_loop_bounds

    allow_scalar_loop_bounds()  # numpy >= 2.4 under Triton 3.6's interpreter

import torch

from qlora_trainer.acceleration import fused_ops as F
from qlora_trainer.acceleration import triton_ops as T

DEV = "cpu" if INTERPRET else "cuda"
DT = torch.float32 if INTERPRET else torch.bfloat16
TOL = 1e-4 if INTERPRET else 2e-2
RESULTS = []
torch.manual_seed(0)


def _poisoned_empty(shape, dtype, device):
    t = torch.empty(shape, dtype=dtype, device=device)
    return t.fill_(float("nan") if dtype.is_floating_point else 7)


T._empty = _poisoned_empty  # every output a launcher allocates starts as NaN (or 7 for the mask)


def mask(seed, j, rows, cols, p):
    """The kernels' keep-mask of projection j, on the CPU."""
    return T.dropout_mask(seed, j, rows, cols, p, DEV).cpu()


def reference_mask(seed, j, n_rows, n_cols, p, device):
    return mask(seed, j, n_rows, n_cols, p).to(device)


F.dropout_mask = reference_mask  # fused_ops._masked looks the name up at call time


def ref(t):
    """The reference's own copy of an input: fp32 on the CPU (where fused_ops runs the torch code)."""
    return t.detach().float().cpu().clone()


def record(op, case, out, expected, tol=TOL):
    out_c = out.detach().double().cpu()
    exp_c = expected.detach().double().cpu()
    entry = {"op": op, "case": case, "tol": tol, "unwritten": int(torch.isnan(out_c).sum())}
    if out_c.shape != exp_c.shape:
        entry.update(ok=False, error=f"shape {tuple(out_c.shape)} != expected {tuple(exp_c.shape)}")
    else:
        rel = float((out_c.nan_to_num(0.0) - exp_c).norm() / exp_c.norm().clamp_min(1e-30))
        entry.update(rel_err=rel, ok=rel < tol and entry["unwritten"] == 0)
    RESULTS.append(entry)


def check(op, case, ok, detail=""):
    RESULTS.append({"op": op, "case": case, "ok": bool(ok), "detail": detail})


def raises(op, case, fn):
    try:
        fn()
    except ValueError as e:
        check(op, case, True, str(e))
    except Exception as e:  # noqa: BLE001
        check(op, case, False, f"{type(e).__name__} instead of ValueError: {e}")
    else:
        check(op, case, False, "no error raised")


def rnd(*shape, scale=1.0):
    return (torch.randn(*shape) * scale).to(DEV, DT)


def run_rope(N, heads, D, kept_heads):
    """RoPE in place on strided views of one [N, total, D] buffer; the other heads stay untouched."""
    case = f"N={N} heads={heads}+{kept_heads} D={D}"
    total = heads + 2 * kept_heads
    cos, sin = rnd(N, D), rnd(N, D)
    for name, fn, fn_ref in (("rope_", T.rope_, F.rope_), ("rope_backward_", T.rope_backward_, F.rope_backward_)):
        buf = rnd(N, total, D)
        original, expected = ref(buf), ref(buf)
        for lo, hi in ((0, heads), (heads, heads + kept_heads)):  # "q" then "k"; "v" is left alone
            fn(buf[:, lo:hi], cos, sin)
            fn_ref(expected[:, lo:hi], ref(cos), ref(sin))
        record(name, case, buf, expected)
        untouched = bool(torch.equal(ref(buf[:, heads + kept_heads:]), original[:, heads + kept_heads:]))
        check(name + ".untouched", case, untouched, "" if untouched else "heads outside the view were modified")


def _backward_cat_sources(layout, rows, S, hq, hk, D, dtype):
    """dq [N, hq, D], dk and dv [N, hk, D] (N = rows * S) in the layouts attention.backward returns:
    "separate" contiguous tensors (FlashAttention-2 varlen); "bshd", views of one padded [rows, S,
    heads, D] buffer through attention._tokens (cuDNN's gradients laid out like the q|k|v buffer:
    token stride > D, head stride D); "bhsd", [rows, heads, S, D] buffers through _tokens (with
    rows == 1 a view whose head stride S * D exceeds its token stride D); "padded", a head stride
    of 2 * D (only the first half of each row's head slot is the head)."""
    from qlora_trainer.acceleration.attention import _tokens

    N = rows * S
    make = lambda *shape: (torch.randn(*shape) * 2).to(DEV, dtype)  # noqa: E731
    if layout == "separate":
        return make(N, hq, D), make(N, hk, D), make(N, hk, D)
    if layout == "bshd":
        buf = make(rows, S, hq + 2 * hk + 1, D)  # one spare head: no view is the whole row
        heads = (buf[:, :, :hq], buf[:, :, hq:hq + hk], buf[:, :, hq + hk:hq + 2 * hk])
        return tuple(_tokens(h.transpose(1, 2)) for h in heads)
    if layout == "bhsd":
        return tuple(_tokens(make(rows, h, S, D)) for h in (hq, hk, hk))
    return tuple(make(N, h, 2 * D)[..., :D] for h in (hq, hk, hk))


def run_rope_backward_cat(rows, S, hq, hk, D, layout):
    """rope_backward_cat against (1) the reference, (2) exactly what it replaces: the plain
    concatenation followed by the in-place rope_backward_ kernel (bit for bit: the same
    arithmetic), and (3) the definition of a gradient: autograd through the forward's rope_ (the
    reference) on the q|k heads of a q|k|v buffer, v passed through. (3) fails for the forward
    rotation in place of the transposed one, and for a v that is not copied as it is."""
    N = rows * S
    for dtype in (torch.float32, torch.bfloat16):
        case = f"N={N} heads={hq}+2x{hk} D={D} {layout} {str(dtype)[6:]}"
        dq, dk, dv = _backward_cat_sources(layout, rows, S, hq, hk, D, dtype)
        if layout in ("bshd", "padded") or (layout == "bhsd" and rows == 1):  # (else _tokens copies)
            strided = not all(t.is_contiguous() for t in (dq, dk, dv))
            check("rope_backward_cat.strided_views", case, strided, "" if strided else "the sources are contiguous")
        cos, sin = rnd(N, D), rnd(N, D)
        out = T.rope_backward_cat(dq, dk, dv, cos, sin)
        check("rope_backward_cat.dtype", case, out.dtype == dtype and out.is_contiguous(), f"{out.dtype}")
        # the interpreter rounds to bf16 by truncation (1 ulp from the reference's rounding)
        tol = TOL if dtype == torch.float32 else max(TOL, 1e-2)
        expected = F.rope_backward_cat(ref(dq), ref(dk), ref(dv), ref(cos), ref(sin))
        record("rope_backward_cat", case, out, expected, tol)
        plain = torch.cat((dq.reshape(N, -1), dk.reshape(N, -1), dv.reshape(N, -1)), dim=1)
        T.rope_backward_(plain.view(N, -1, D)[:, :hq + hk], cos, sin)
        same = bool(torch.equal(out, plain))
        check("rope_backward_cat.is_cat_then_rope_backward_", case, same,
              "" if same else f"{int((out != plain).sum())} elements differ from cat + rope_backward_")
        # v's gradient is the attention's dv itself, bit for bit
        v_same = bool(torch.equal(out.view(N, -1, D)[:, hq + hk:], dv))
        check("rope_backward_cat.v_copied", case, v_same, "" if v_same else "v's heads are not dv")
        x = torch.zeros(N, hq + 2 * hk, D, dtype=torch.float64, requires_grad=True)
        with torch.enable_grad():
            y = x.clone()
            F.rope_(y[:, :hq + hk], ref(cos).double(), ref(sin).double())
            g = torch.cat((ref(dq), ref(dk), ref(dv)), dim=1).double()
            (gx,) = torch.autograd.grad(y, x, g)
        record("rope_backward_cat.autograd", case, out, gx.view(N, -1), tol)


def run_elementwise(N, H, I, heads, D, kept_heads):
    case = f"N={N} H={H} I={I}"
    # RMSNorm
    x, w, gy = rnd(N, H, scale=3.0), rnd(H, scale=0.5) + 1.0, rnd(N, H)
    y, rstd = T.rms_norm(x, w, 1e-6)
    y_ref, rstd_ref = F.rms_norm(ref(x), ref(w), 1e-6)
    record("rms_norm.y", case, y, y_ref)
    record("rms_norm.rstd", case, rstd, rstd_ref)
    if not INTERPRET:  # an fp32 residual stream into a bf16 GEMM input (the interpreter runs fp32 only)
        y32, _ = T.rms_norm(x.float(), w, 1e-6, torch.bfloat16)
        record("rms_norm.fp32_in", case, y32, F.rms_norm(ref(x.float()), ref(w), 1e-6)[0])
    gx = T.rms_norm_backward(gy, x, w, rstd)
    record("rms_norm_backward", case, gx, F.rms_norm_backward(ref(gy), ref(x), ref(w), rstd_ref))
    # the forward's output written over gy once read (what the fused layer's LoRA A gradient reads)
    gy_over = gy.clone()
    got = T.rms_norm_backward(gy_over, x, w, rstd, forward_into_gy=True)
    check("rms_norm_backward.forward_into_gy", case, torch.equal(got, gx) and torch.equal(gy_over, y),
          f"gx equal {torch.equal(got, gx)}, {int((gy_over != y).sum())} elements differ from rms_norm's")
    run_rope(N, heads, D, kept_heads)
    # SwiGLU
    gu, gh = rnd(N, 2 * I, scale=2.0), rnd(N, I)
    record("swiglu", case, T.swiglu(gu), F.swiglu(ref(gu)))
    d = T.swiglu_backward(gh, gu)
    record("swiglu_backward", case, d, F.swiglu_backward(ref(gh), ref(gu)))
    gh_over = gh.clone()
    got = T.swiglu_backward(gh_over, gu, forward_into_gh=True)
    m = T.swiglu(gu)
    check("swiglu_backward.forward_into_gh", case, torch.equal(got, d) and torch.equal(gh_over, m),
          f"gradient equal {torch.equal(got, d)}, {int((gh_over != m).sum())} elements differ from swiglu's")


class Refusing:
    """A jitted kernel that raises OutOfResources, as Triton does before anything runs when a
    launch needs more shared memory than the card has, for the launches `refuse(kwargs)` picks."""

    def __init__(self, kernel, refuse):
        self.kernel, self.refuse = kernel, refuse

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            if self.refuse(kwargs):
                raise T.OutOfResources(300000, 232448, "shared memory")
            return self.kernel[grid](*args, **kwargs)
        return launch


def run_step_down(op, kernels, launches, call, case):
    """A default launch steps down to the first of its fallbacks that fits the card's shared memory
    (a large rank, a card with less than an H100's) and remembers it: with every launch of three or
    more pipeline stages refused, the first two-stage one runs, computes what the reference does,
    and is the one chosen again; with every launch refused, the last one's error propagates.
    `call()` -> (output, reference) pairs of one fresh call of the op's default launch."""
    real = {name: getattr(T, name) for name in kernels}
    memo = dict(T._FITTING_LAUNCH)
    two_stages = next(i for i, lc in enumerate(launches) if lc.stages == 2)
    try:
        T._FITTING_LAUNCH.clear()
        for name in kernels:
            setattr(T, name, Refusing(real[name], lambda kw: kw.get("STAGES", 1) >= 3))
        for attempt in ("first call", "remembered"):
            for part, (out, expected) in enumerate(call()):
                record(f"{op}.stepped_down", f"{case} {attempt} output {part}", out, expected)
            chosen = list(T._FITTING_LAUNCH.values())
            check(f"{op}.stepped_down_launch", f"{case} {attempt}", chosen == [two_stages], str(chosen))
        T._FITTING_LAUNCH.clear()
        for name in kernels:
            setattr(T, name, Refusing(real[name], lambda kw: True))
        try:
            call()
            check(f"{op}.nothing_fits", case, False, "no error when no launch fits")
        except T.OutOfResources as exc:
            check(f"{op}.nothing_fits", case, not T._FITTING_LAUNCH, str(exc))
    finally:
        for name, kernel in real.items():
            setattr(T, name, kernel)
        T._FITTING_LAUNCH.clear()
        T._FITTING_LAUNCH.update(memo)


def run_epilogue_step_downs(N, heads, kv_heads, D, I, R, a, B, Bgu, cos, sin, case):
    W = (heads + 2 * kv_heads) * D

    def rope():
        qkv = rnd(N, W, scale=2.0)
        expected = ref(qkv)
        F.lora_rope_(expected, ref(a), ref(B), ref(cos), ref(sin), heads + kv_heads, D)
        T.lora_rope_(qkv, a, B, cos, sin, heads + kv_heads, D)
        return [(qkv, expected)]

    def swiglu():
        gu = rnd(N, 2 * I, scale=2.0)
        gu_ref = ref(gu)
        h_ref = F.lora_swiglu_(gu_ref, ref(a), ref(Bgu))
        return [(T.lora_swiglu_(gu, a, Bgu), h_ref), (gu, gu_ref)]

    run_step_down("lora_rope_", ("_lora_rope_kernel",), (T.LORA_ROPE_LAUNCH, *T.LORA_ROPE_FALLBACKS), rope, case)
    run_step_down("lora_swiglu_", ("_lora_swiglu_persistent_kernel", "_lora_swiglu_kernel"),
                  (T.LORA_SWIGLU_LAUNCH, *T.LORA_SWIGLU_FALLBACKS), swiglu, case)


def run_adapter_epilogues(N, heads, kv_heads, D, I, H, R):
    """The adapter product joined in fp32 with RoPE (q|k|v), SwiGLU (gate|up) and the residual add
    (o, down), against the references (fp32 sums, one rounding); the residual stream is fp32."""
    case = f"N={N} heads={heads}+2x{kv_heads} D={D} I={I} H={H} R={R}"
    W = (heads + 2 * kv_heads) * D
    a, cos, sin = rnd(N, R), rnd(N, D), rnd(N, D)
    B = rnd(W, R, scale=0.3)
    qkv = rnd(N, W, scale=2.0)
    expected = ref(qkv)
    F.lora_rope_(expected, ref(a), ref(B), ref(cos), ref(sin), heads + kv_heads, D)
    T.lora_rope_(qkv, a, B, cos, sin, heads + kv_heads, D)
    record("lora_rope_", case, qkv, expected)
    # other tilings (benchmarks/epilogue_timing.py's variants): several heads per program, unrolled or
    # in a pipelined loop, the last program's heads partly past the end; column tiles past the end
    # of gate|up
    for launch in (T.EpilogueLaunch(block_m=16, heads=2), T.EpilogueLaunch(block_m=64, heads=4, warps=8),
                   T.EpilogueLaunch(block_m=16, heads=2, heads_loop=True, stages=2), *T.LORA_ROPE_FALLBACKS):
        tiled = rnd(N, W, scale=2.0)
        tiled_expected = ref(tiled)
        F.lora_rope_(tiled_expected, ref(a), ref(B), ref(cos), ref(sin), heads + kv_heads, D)
        T.lora_rope_(tiled, a, B, cos, sin, heads + kv_heads, D, launch=launch)
        record("lora_rope_.tiled", f"{case} {launch}", tiled, tiled_expected)
    gu, Bgu = rnd(N, 2 * I, scale=2.0), rnd(2 * I, R, scale=0.3)
    gu_ref = ref(gu)
    m_ref = F.lora_swiglu_(gu_ref, ref(a), ref(Bgu))
    m = T.lora_swiglu_(gu, a, Bgu)
    record("lora_swiglu_.out", case, m, m_ref)
    record("lora_swiglu_.gate_up", case, gu, gu_ref)
    for launch in (T.EpilogueLaunch(block_m=32, block_n=128, warps=8),):
        tiled_src = rnd(N, 2 * I, scale=2.0)
        tiled_ref = ref(tiled_src)
        record("lora_swiglu_.tiled", f"{case} {launch}", T.lora_swiglu_(tiled_src, a, Bgu, launch=launch),
               F.lora_swiglu_(tiled_ref, ref(a), ref(Bgu)))
        record("lora_swiglu_.tiled_gate_up", f"{case} {launch}", tiled_src, tiled_ref)
    raises("lora_rope_", "a persistent launch", lambda: T.lora_rope_(
        rnd(N, W), a, B, cos, sin, heads + kv_heads, D, launch=T.EpilogueLaunch(block_m=16, programs_per_sm=1)))
    # persistent programs (EpilogueLaunch.programs_per_sm), each walking several tiles through a
    # pipelined loop; with the SM count taken as 1, two programs share all the tiles, and at N=37,
    # I=80 the second one's last tile lies past the end (masked out whole)
    persistent = T.EpilogueLaunch(block_m=16, block_n=32, warps=4, programs_per_sm=2, stages=2)
    sms, T._num_sms = T._num_sms, lambda device: 1
    try:
        walked = rnd(N, 2 * I, scale=2.0)
        walked_ref = ref(walked)
        record("lora_swiglu_.persistent", f"{case} {persistent}", T.lora_swiglu_(walked, a, Bgu, launch=persistent),
               F.lora_swiglu_(walked_ref, ref(a), ref(Bgu)))
        record("lora_swiglu_.persistent_gate_up", f"{case} {persistent}", walked, walked_ref)
    finally:
        T._num_sms = sms
    run_epilogue_step_downs(N, heads, kv_heads, D, I, R, a, B, Bgu, cos, sin, case)
    x, y, Bo = rnd(N, H).float(), rnd(N, H), rnd(H, R, scale=0.3)
    out = T.lora_residual_add(x, y, a, Bo)
    check("lora_residual_add.dtype", case, out.dtype == x.dtype, str(out.dtype))
    record("lora_residual_add", case, out, F.lora_residual_add(ref(x), ref(y), ref(a), ref(Bo)))
    gh, xn, w, gres = rnd(N, H), rnd(N, H).float(), rnd(H, scale=0.5) + 1.0, rnd(N, H).float()
    _, rstd = F.rms_norm(ref(xn), ref(w), 1e-6)
    gx_ref = F.rms_norm_backward(ref(gh), ref(xn), ref(w), rstd, ref(gres))
    record("rms_norm_backward.residual", case, T.rms_norm_backward(gh, xn, w, rstd.to(DEV), gres), gx_ref)
    # into a caller's buffer (a graphed layer's static output: no copy after the kernel), bit for bit
    # what the launcher's own output holds
    # an fp32 stream's norm output (the bf16 GEMM input, compiled) written over gh once read
    yn, rstd_n = T.rms_norm(xn, w, 1e-6, gh.dtype)
    gh_over = gh.clone()
    got = T.rms_norm_backward(gh_over, xn, w, rstd_n, gres, forward_into_gy=True)
    same_gx = torch.equal(got, T.rms_norm_backward(gh, xn, w, rstd_n, gres))
    check("rms_norm_backward.residual.forward_into_gy", case, same_gx and torch.equal(gh_over, yn),
          f"gx equal {same_gx}, {int((gh_over != yn).sum())} elements differ from rms_norm's")
    buf = torch.full_like(x, float("nan"))
    got = T.lora_residual_add(x, y, a, Bo, out=buf)
    check("lora_residual_add.out", case, got is buf and torch.equal(buf, out), "not written in place")
    buf = torch.full_like(xn, float("nan"))
    got = T.rms_norm_backward(gh, xn, w, rstd.to(DEV), gres, out=buf)
    check("rms_norm_backward.residual.out", case,
          got is buf and torch.equal(buf, T.rms_norm_backward(gh, xn, w, rstd.to(DEV), gres)), "not written in place")
    # and its compute-dtype copy from the same kernel: what .to() makes of the stored gradient, bit for bit
    # (the interpreter rounds fp32 to bf16 towards zero whatever the kernel asks; compiled, it is rtne)
    for cdt in (torch.float16,) if INTERPRET else (torch.bfloat16, torch.float16):
        buf_c = torch.full(xn.shape, float("nan"), dtype=cdt, device=xn.device)
        got = T.rms_norm_backward(gh, xn, w, rstd.to(DEV), gres, compute_out=buf_c)
        check("rms_norm_backward.residual.compute_out", f"{case} {cdt}", torch.equal(buf_c, got.to(cdt)),
              f"max diff {(buf_c.float() - got.to(cdt).float()).abs().max()}")
    raises("lora_residual_add.out", case + " wrong dtype", lambda: T.lora_residual_add(x, y, a, Bo, out=torch.empty_like(x, dtype=torch.float64)))
    raises("rms_norm_backward.residual.out", case + " non-contiguous",
           lambda: T.rms_norm_backward(gh, xn, w, rstd.to(DEV), gres, out=xn.new_empty(xn.shape[1], xn.shape[0]).t()))


def run_nf4(shape, nested, blocksize=64, launch=None):
    """NF4 dequantization bit for bit as bitsandbytes' own (plain and double-quantized absmax)."""
    import copy

    import bitsandbytes.functional as bF

    case = f"shape={shape} nested={nested} blocksize={blocksize} launch={launch}"
    w = torch.randn(*shape) * 0.02
    q, qs = bF.quantize_4bit(w.to(DEV, DT), quant_type="nf4", compress_statistics=nested, blocksize=blocksize)
    out = torch.full(shape, float("nan"), device=DEV, dtype=DT)
    T.dequantize_nf4(q, qs, out, _launch=launch)
    # bitsandbytes numbers the blocks over the flattened tensor (quantize_4bit, its CUDA kernels).
    # Its AVX-512 CPU kernel (0.50.2) dequantizes a matrix row by row and decodes a row whose width
    # is not a multiple of the blocksize wrongly (round trip off by half the values' range): on the
    # CPU the reference is its dequantization of the flattened tensor, one row that no block crosses.
    flat = copy.copy(qs)
    flat.shape = torch.Size([w.numel()])
    expected = bF.dequantize_4bit(q, qs if DEV == "cuda" else flat).view(shape)
    check("dequantize_nf4", case, torch.equal(out, expected), f"max diff {float((out - expected).abs().max())}")
    if launch is None and blocksize == 64:
        # a set flag leaves the output as it was (the region already holds the weight: turn_weights.py),
        # a clear one writes it
        flag = torch.ones(1, dtype=torch.int32, device=DEV)
        kept = torch.full(shape, float("nan"), device=DEV, dtype=DT)
        T.dequantize_nf4(q, qs, kept, skip=flag)
        check("dequantize_nf4", case + " skip=1", bool(kept.isnan().all()), "wrote with the flag set")
        flag.zero_()
        T.dequantize_nf4(q, qs, kept, skip=flag)
        check("dequantize_nf4", case + " skip=0", torch.equal(kept, expected), "differs with the flag clear")


def run_nf4_errors():
    import copy

    import bitsandbytes.functional as bF

    q, qs = bF.quantize_4bit(torch.randn(8, 96).to(DEV, DT), quant_type="nf4", blocksize=64)
    odd = copy.copy(qs)
    odd.blocksize = 96  # the kernel's tile is a whole number of power-of-two blocks
    raises("dequantize_nf4", "blocksize 96", lambda: T.dequantize_nf4(q, odd, torch.empty(8, 96, device=DEV, dtype=DT)))
    raises("dequantize_nf4", "values", lambda: T.dequantize_nf4(q, qs, torch.empty(8, 95, device=DEV, dtype=DT)))


def lora_case(N, H, r, n, p, seed):
    """Random x, A, ga and a starting gx, and the float64 expectations of lora_a, lora_a_backward
    and lora_x_backward_ from the written-out formulas with the kernels' own masks."""
    x, A, ga = rnd(N, H), rnd(n * r, H, scale=0.1), rnd(N, n * r)
    gx0 = rnd(N, H)
    masks = [mask(seed, j, N, H, p).double() for j in range(n)]
    xd, Ad, gad = x.double().cpu(), A.double().cpu(), ga.double().cpu()
    blocks = [slice(j * r, (j + 1) * r) for j in range(n)]
    exp_a = torch.cat([(xd * masks[j]) @ Ad[b].t() for j, b in enumerate(blocks)], dim=1)
    exp_gA = torch.cat([gad[:, b].t() @ (xd * masks[j]) for j, b in enumerate(blocks)], dim=0)
    exp_gx = gx0.double().cpu() + sum((gad[:, b] @ Ad[b]) * masks[j] for j, b in enumerate(blocks))
    return x, A, ga, gx0, exp_a, exp_gA, exp_gx


def run_lora(N, H, r, n, p, seed, splits=None):
    case = f"N={N} H={H} r={r} n={n} p={p} seed={seed}" + (f" splits={splits}" if splits else "")
    x, A, ga, gx0, exp_a, exp_gA, exp_gx = lora_case(N, H, r, n, p, seed)

    a = T.lora_a(x, A, seed, p, n, **({"splits": splits} if splits else {}))
    record("lora_a", case, a, exp_a)
    record("lora_a.vs_fused_ops", case, a, F.lora_a(ref(x), ref(A), seed, p, n))
    kw = {"splits": splits} if splits else {}
    gA = T.lora_a_backward(ga, x, seed, p, n, **kw)
    check("lora_a_backward.dtype", case, gA.dtype == torch.float32, str(gA.dtype))
    record("lora_a_backward", case, gA, exp_gA)
    record("lora_a_backward.vs_fused_ops", case, gA, F.lora_a_backward(ref(ga), ref(x), seed, p, n))
    into = torch.full_like(gA, float("nan"))  # a graphed layer's source buffer: overwritten, not added to
    T.lora_a_backward(ga, x, seed, p, n, out=into, **kw)
    record("lora_a_backward.out", case, into, exp_gA)
    # out_zeroed: the caller zeroed the buffer (a graphed layer's sources, in one fill): the kernel
    # sums into it as it is, so a buffer of ones comes back as ones plus the gradient
    ones = torch.ones_like(gA)
    T.lora_a_backward(ga, x, seed, p, n, out=ones, out_zeroed=True, **kw)
    record("lora_a_backward.out_zeroed", case, ones, exp_gA + 1.0)
    gx = gx0.clone()
    T.lora_x_backward_(gx, ga, A, seed, p, n)
    record("lora_x_backward_", case, gx, exp_gx)
    gx_ref = ref(gx0)
    F.lora_x_backward_(gx_ref, ref(ga), ref(A), seed, p, n)
    record("lora_x_backward_.vs_fused_ops", case, gx, gx_ref)


def run_lora_a_configs(N, H, r, n, p, seed, splits=None):
    """lora_a in the launch shapes that benchmarks/lora_a_timing.py sweeps (the dot transposed,
    all n projections in one program, other tiles and warps) against the float64 formula with
    the kernels' own mask: every shape draws the same keep-mask and computes the same product."""
    case = f"N={N} H={H} r={r} n={n} p={p}" + (f" splits={splits}" if splits else "")
    x, A = rnd(N, H), rnd(n * r, H, scale=0.1)
    xd, Ad = x.double().cpu(), A.double().cpu()
    exp_a = torch.cat([(xd * mask(seed, j, N, H, p).double()) @ Ad[j * r:(j + 1) * r].t() for j in range(n)], dim=1)
    for fields in (dict(transposed=True), dict(all_n=True), dict(all_n=True, transposed=True, num_warps=8),
                   dict(all_n=True, block_m=128, block_k=128, num_stages=2), dict(transposed=True, programs_per_sm=8)):
        cfg = T.LoraAConfig(**fields)
        record("lora_a.config", f"{case} {fields}", T.lora_a(x, A, seed, p, n, splits=splits, config=cfg), exp_a)


def run_masked_backward_launches(N, H, r, n, p, seed):
    """lora_a_backward and lora_x_backward_ in the launch shapes that benchmarks/lora_a_timing.py
    sweeps (tiles of 16-128 tokens and 64-256 columns, 8 warps, 1-4 stages, several programs per
    SM) against the float64 formulas with the kernels' own mask: the tile changes the order of the
    fp32 sums only."""
    case = f"N={N} H={H} r={r} n={n} p={p}"
    x, A, ga, gx0, _, exp_gA, exp_gx = lora_case(N, H, r, n, p, seed)
    for fields in (dict(block_m=16, block_h=64), dict(block_m=128, block_h=64, warps=8, stages=2),
                   dict(block_m=64, block_h=128, stages=4, programs_per_sm=8),
                   dict(block_m=32, block_h=256, warps=8, stages=1, programs_per_sm=2)):
        launch = T.MaskedBackwardLaunch(**fields)
        record("lora_a_backward.launch", f"{case} {fields}", T.lora_a_backward(ga, x, seed, p, n, launch=launch), exp_gA)
        gx = gx0.clone()
        T.lora_x_backward_(gx, ga, A, seed, p, n, launch=launch)
        record("lora_x_backward_.launch", f"{case} {fields}", gx, exp_gx)


def run_lora_b_grads(N, rows, r, launch=None, splits=None):
    """The B side's two products from one read of g: ga = g @ B (B block-diagonal, as LoRASet
    builds it; in g's dtype) and each projection's gB_j = g_j^T @ a_j (fp32), against float64
    formulas."""
    n, W = len(rows), sum(rows)
    case = f"N={N} rows={rows} r={r} launch={launch} splits={splits}"
    g, a = rnd(N, W), rnd(N, n * r)
    blocks = [rnd(m, r, scale=0.1) for m in rows]
    B = torch.block_diag(*[b.cpu() for b in blocks]).to(DEV, DT)
    gd, ad = g.double().cpu(), a.double().cpu()
    starts = [sum(rows[:j]) for j in range(n)]
    exp_ga = gd @ B.double().cpu()
    exp_gB = torch.cat([gd[:, s0:s0 + m].t() @ ad[:, j * r:(j + 1) * r] for j, (s0, m) in enumerate(zip(starts, rows))])
    kw = {k: v for k, v in (("launch", launch), ("splits", splits)) if v is not None}
    into = torch.full((W, r), float("nan"), device=DEV)
    ga, gB = T.lora_b_grads(g, a, B, rows, out=into, **kw)
    check("lora_b_grads.dtypes", case, ga.dtype == DT and gB.dtype == torch.float32 and gB.data_ptr() == into.data_ptr(),
          f"{ga.dtype} {gB.dtype}")
    record("lora_b_grads.ga", case, ga, exp_ga)
    record("lora_b_grads.gB", case, gB, exp_gB)
    ga_ref, gB_ref = F.lora_b_grads(ref(g), ref(a), ref(B), rows)
    record("lora_b_grads.vs_fused_ops_ga", case, ga, ga_ref)
    record("lora_b_grads.vs_fused_ops_gB", case, gB, gB_ref)
    ones = torch.ones((W, r), device=DEV)  # out_zeroed, as in run_lora: summed into as it is
    _, gB_ones = T.lora_b_grads(g, a, B, rows, out=ones, out_zeroed=True, **kw)
    record("lora_b_grads.out_zeroed", case, gB_ones, exp_gB + 1.0)


def run_lora_factors(outs, r, in_f, out_dtype):
    """A LoRA set's static factors in one launch, bit for bit the torch reference (cat with the
    cast, each B block scaled and rounded once; the zeros around the blocks untouched). fp16
    outputs in the interpreter (its bf16 conversion truncates; compiled, both round to nearest
    even as torch does)."""
    case = f"outs={outs} r={r} in={in_f} {out_dtype}"
    n = len(outs)
    As = [torch.randn(r, in_f).to(DEV) for _ in range(n)]
    Bs = [torch.randn(o, r).to(DEV) for o in outs]
    scales = torch.tensor([2.0 / 3.0, 0.5 / 0.95, 1.1][:n], dtype=torch.float32, device=DEV)
    A = torch.full((n * r, in_f), float("nan"), dtype=out_dtype, device=DEV)
    B = torch.full((sum(outs), n * r), float("nan"), dtype=out_dtype, device=DEV)
    row = 0
    for j, o in enumerate(outs):  # make_static's zeros around the blocks, which must stay
        B[row:row + o] = 0
        row += o
    A_ref, B_ref = A.cpu().clone(), B.cpu().clone()
    F.lora_factors_(A_ref, B_ref, [a.cpu() for a in As], [b.cpu() for b in Bs], scales.cpu())
    T.lora_factors_(A, B, As, Bs, scales)
    check("lora_factors_.A", case, torch.equal(A.cpu(), A_ref), f"max diff {float((A.cpu().float() - A_ref.float()).abs().max())}")
    check("lora_factors_.B", case, torch.equal(B.cpu(), B_ref), f"max diff {float((B.cpu().float() - B_ref.float()).abs().max())}")


def run_grads_accumulate(sizes_a, rows_b, rank):
    """A graphed layer's LoRA gradient accumulation: acc[:nA] += gA, acc[nA:] += float(gB) * the
    row's scale, bit for bit the torch reference (the cast, the scaling, the add it replaces)."""
    case = f"nA={sum(sizes_a)} rows={rows_b} r={rank}"
    n_a, n_b = sum(sizes_a), sum(rows_b) * rank
    acc = torch.randn(n_a + n_b).to(DEV)
    src_a = torch.randn(n_a).to(DEV)
    src_b = torch.randn(n_b).to(DEV, torch.bfloat16)  # read and widened: exact in the interpreter too
    scale = torch.cat([torch.full((r,), s) for r, s in zip(rows_b, (0.7, 2.0 / 3.0, 1.1, 0.3))]).to(DEV)
    expected = acc.cpu().clone()
    F.lora_grads_accumulate_(expected, src_a.cpu(), src_b.cpu(), scale.cpu(), rank)
    old = acc.cpu().clone()  # the formula of LoRASet.grads and torch._foreach_add_
    old[:n_a].add_(src_a.cpu())
    at = n_a
    for r, s in zip(rows_b, (0.7, 2.0 / 3.0, 1.1, 0.3)):
        old[at:at + r * rank].add_(src_b.cpu()[at - n_a:at - n_a + r * rank].to(torch.float32) * s)
        at += r * rank
    check("lora_grads_accumulate_.reference_vs_old_formula", case, torch.equal(expected, old))
    T.lora_grads_accumulate_(acc, src_a, src_b, scale, rank)
    check("lora_grads_accumulate_", case, torch.equal(acc.cpu(), expected),
          f"max diff {float((acc.cpu().double() - expected.double()).abs().max())}")


def run_sum_planes(S, shape):
    """lora_a's split-K reduction: the planes added in order in fp32, rounded once, bit for bit
    what the same additions in torch give (so forward and recompute agree whatever the split)."""
    case = f"S={S} shape={shape}"
    parts = (torch.randn(S, *shape) * 3.0).to(DEV)
    for dtype in {DT, torch.float32}:
        expected = parts[0].clone()
        for s in range(1, S):
            expected = expected + parts[s]
        out = T._sum_planes(parts, dtype)
        check("sum_planes", f"{case} {dtype}", out.dtype == dtype and torch.equal(out, expected.to(dtype)),
              f"max diff {float((out.double() - expected.to(dtype).double()).abs().max())}")


def run_cross_entropy(C, V, scale):
    """Loss per row and the gradient written over the logits; some rows ignored (-100, and labels
    outside the vocabulary that nobody checked: no read past the row), one label at each end of the
    vocabulary, logits wide enough to take more than one block."""
    case = f"C={C} V={V} scale={scale}"
    logits = rnd(C, V, scale=3.0)
    labels = torch.randint(0, V, (C,))
    labels[1] = -100
    labels[2], labels[3] = 0, V - 1
    if C > 5:
        labels[4], labels[5] = V, -7
    labels = labels.to(DEV)
    expected = ref(logits)
    logits_in = logits.clone()
    loss_ref = F.cross_entropy_rows_(expected, labels.cpu(), scale)
    loss = T.cross_entropy_rows_(logits, labels, scale)
    record("cross_entropy_rows_.loss", case, loss, loss_ref)
    if scale is not None:
        record("cross_entropy_rows_.grad", case, logits, expected)
        ignored = [1, 4, 5] if C > 5 else [1]
        check("cross_entropy_rows_.ignored_row_zero", case, bool((logits[ignored] == 0).all()), "")
        # the scale as a device scalar (the Trainer's token count): the same loss and gradient, bit for bit
        again = logits_in.clone()
        loss_t = T.cross_entropy_rows_(again, labels, torch.tensor(scale, dtype=torch.float32, device=DEV))
        check("cross_entropy_rows_.tensor_scale", case, bool(torch.equal(loss_t, loss) and torch.equal(again, logits)),
              "a tensor scale gave other values than the same float")
    else:
        record("cross_entropy_rows_.logits_untouched", case, logits, expected)


def run_masks():
    rows, cols, p = 64, 504, 0.3
    m = T.dropout_mask(7, 0, rows, cols, p, DEV)
    raw = m.view(torch.uint8)
    check("dropout_mask.written", "", bool(((raw == 0) | (raw == 1)).all()), "values other than 0/1 (unwritten)")
    check("dropout_mask.dtype", "", m.dtype == torch.bool and tuple(m.shape) == (rows, cols), f"{m.dtype} {m.shape}")
    frac = m.float().mean().item()
    check("dropout_mask.keep_fraction", f"p={p}", abs(frac - (1 - p)) < 0.015, f"kept {frac:.4f}, expected {1 - p}")
    frac9 = T.dropout_mask(7, 0, rows, cols, 0.9, DEV).float().mean().item()
    check("dropout_mask.keep_fraction", "p=0.9", abs(frac9 - 0.1) < 0.01, f"kept {frac9:.4f}, expected 0.1")
    check("dropout_mask.p0_keeps_all", "", bool(T.dropout_mask(7, 0, rows, cols, 0.0, DEV).all()), "")
    check("dropout_mask.deterministic", "", torch.equal(m, T.dropout_mask(7, 0, rows, cols, p, DEV)), "")
    # Same element, same mask, whatever the shape it is drawn in (offset row * n_cols + col)
    check("dropout_mask.subblock", "", torch.equal(m[:40], T.dropout_mask(7, 0, 40, cols, p, DEV)), "")
    expected_agreement = p * p + (1 - p) * (1 - p)  # of two independent masks
    for what, other in (("j", T.dropout_mask(7, 1, rows, cols, p, DEV)),
                        ("seed", T.dropout_mask(8, 0, rows, cols, p, DEV)),
                        ("seed*64+j", T.dropout_mask(6, 63, rows, cols, p, DEV)),
                        ("large seed", T.dropout_mask(2**40 + 7, 0, rows, cols, p, DEV))):
        agree = (m == other).float().mean().item()
        check("dropout_mask.independent_" + what, "", abs(agree - expected_agreement) < 0.02,
              f"agreement {agree:.4f}, independent masks agree on {expected_agreement:.4f}")
    run_mask_statistics()


def run_mask_statistics(rows=256, cols=2048, p=0.05):
    """The draw is a fair coin at the LoRA recipe's p, element by element: 512k elements, each
    tolerance 5 standard deviations. Dropped pairs at distance 1 (the two halves of one Philox
    output), 2 and 6 (other outputs of the same call), 8 (the next counter) and one row (n_cols)
    must be as frequent as p^2, and the rate must be the same in every 128-column stripe."""
    m = T.dropout_mask(11, 2, rows, cols, p, DEV).cpu()
    dropped = (~m).flatten().double()
    n = dropped.numel()
    rate = dropped.mean().item()
    sd = (p * (1 - p) / n) ** 0.5
    check("dropout_mask.stat_rate", f"p={p}", abs(rate - p) < 5 * sd, f"dropped {rate:.5f}, expected {p} +- {5 * sd:.5f}")
    for lag in (1, 2, 6, 8, cols):
        both = (dropped[:-lag] * dropped[lag:]).mean().item()
        sd2 = (p * p * (1 - p * p) / (n - lag)) ** 0.5
        check("dropout_mask.stat_pairs", f"lag {lag}", abs(both - p * p) < 5 * sd2,
              f"both dropped {both:.6f}, independent {p * p:.6f} +- {5 * sd2:.6f}")
    stripes = (~m).double().reshape(rows, cols // 128, 128).mean((0, 2))
    sd3 = (p * (1 - p) / (rows * 128)) ** 0.5
    worst = (stripes - p).abs().max().item()
    # 16 stripes: 5 sd bounds the largest of them too (about 1e-5 chance each of passing it)
    check("dropout_mask.stat_stripes", "", worst < 5 * sd3, f"worst stripe off by {worst:.5f} (5 sd {5 * sd3:.5f})")


def run_errors():
    x = rnd(8, 32)
    raises("rms_norm", "non-contiguous x", lambda: T.rms_norm(x.t(), rnd(8), 1e-6))
    raises("rms_norm", "w of the wrong size", lambda: T.rms_norm(x, rnd(31), 1e-6))
    raises("rope_", "cos of the wrong shape", lambda: T.rope_(rnd(8, 2, 16), rnd(8, 8), rnd(8, 16)))
    raises("rope_", "inner dim not contiguous", lambda: T.rope_(rnd(8, 16, 2).transpose(1, 2), rnd(8, 16), rnd(8, 16)))
    q, kv = rnd(8, 4, 16), rnd(8, 2, 16)
    cs = rnd(8, 16)
    raises("rope_backward_cat", "dk of another dtype", lambda: T.rope_backward_cat(q, kv.half(), kv, cs, cs))
    raises("rope_backward_cat", "dv heads not dk's", lambda: T.rope_backward_cat(q, kv, rnd(8, 3, 16), cs, cs))
    raises("rope_backward_cat", "dk tokens not dq's", lambda: T.rope_backward_cat(q, rnd(7, 2, 16), rnd(7, 2, 16), cs, cs))
    raises("rope_backward_cat", "inner dim not contiguous",
           lambda: T.rope_backward_cat(q, kv, rnd(8, 16, 2).transpose(1, 2), cs, cs))
    raises("rope_backward_cat", "sin of the wrong shape", lambda: T.rope_backward_cat(q, kv, kv, cs, rnd(8, 8)))
    raises("swiglu", "odd width", lambda: T.swiglu(rnd(8, 33)))
    raises("swiglu_backward", "gh of the wrong shape", lambda: T.swiglu_backward(rnd(8, 15), rnd(8, 32)))
    g32, r32 = rnd(8, 32), torch.ones(8, device=DEV)
    raises("rms_norm_backward", "the forward over a gy that is also the residual",
           lambda: T.rms_norm_backward(g32, x, rnd(32), r32, residual=g32, forward_into_gy=True))
    raises("lora_a", "A rows not n * r", lambda: T.lora_a(x, rnd(10, 32), 1, 0.1, 3))
    raises("lora_a", "dtype mismatch", lambda: T.lora_a(x, rnd(16, 32).double(), 1, 0.1, 1))
    raises("lora_a", "negative seed", lambda: T.lora_a(x, rnd(16, 32), -1, 0.1, 1))
    raises("lora_a", "width not divisible by 8", lambda: T.lora_a(rnd(8, 36), rnd(16, 36), 1, 0.1, 1))
    raises("lora_a_backward", "N mismatch", lambda: T.lora_a_backward(rnd(7, 16), x, 1, 0.1, 1))
    raises("lora_x_backward_", "ga width", lambda: T.lora_x_backward_(rnd(8, 32), rnd(8, 15), rnd(16, 32), 1, 0.1, 1))
    raises("lora_b_grads", "rows no column block divides",
           lambda: T.lora_b_grads(rnd(8, 48), rnd(8, 16), rnd(48, 16), [40, 8], launch=T.LoraBGradsLaunch(block_n=16)))
    raises("lora_b_grads", "rows not summing to W", lambda: T.lora_b_grads(rnd(8, 48), rnd(8, 16), rnd(48, 16), [32]))
    raises("MaskedBackwardLaunch", "a 48-token tile", lambda: T.MaskedBackwardLaunch(block_m=48, block_h=64))
    raises("MaskedBackwardLaunch", "3 warps", lambda: T.MaskedBackwardLaunch(block_m=32, block_h=64, warps=3))


def run_dispatch():
    """On a GPU the fused_ops entry points must reach the kernels (same names and signatures)."""
    x, w = rnd(64, 256), rnd(256)
    check("dispatch.rms_norm", "", torch.equal(F.rms_norm(x, w, 1e-6)[0], T.rms_norm(x, w, 1e-6)[0]), "")
    gu = rnd(64, 512)
    check("dispatch.swiglu", "", torch.equal(F.swiglu(gu), T.swiglu(gu)), "")
    A = rnd(48, 256, scale=0.1)
    check("dispatch.lora_a", "", torch.equal(F.lora_a(x, A, 3, 0.1, 3), T.lora_a(x, A, 3, 0.1, 3)), "")
    check("dispatch.dropout_mask", "", F._kernel(x, "dropout_mask") is T.dropout_mask, "")
    q, kv, cs = rnd(64, 4, 128), rnd(64, 2, 128), rnd(64, 128)
    check("dispatch.rope_backward_cat", "",
          torch.equal(F.rope_backward_cat(q, kv, kv, cs, cs), T.rope_backward_cat(q, kv, kv, cs, cs)), "")


run_masks()
run_errors()
run_elementwise(N=37, H=96, I=80, heads=3, D=16, kept_heads=2)
run_elementwise(N=19, H=100, I=52, heads=5, D=12, kept_heads=1)
run_rope(N=200, heads=3, D=16, kept_heads=2)  # several programs per view (256 (token, head) rows each)
for layout in ("separate", "bshd", "bhsd", "padded"):
    # odd token counts; GQA; 256 (token, head) pairs a program at D=16: q's last tile (3 x 37 = 111
    # pairs, or 3 x 91) is partial and k's and v's ranges start after it
    run_rope_backward_cat(rows=1, S=37, hq=3, hk=1, D=16, layout=layout)
    run_rope_backward_cat(rows=7, S=13, hq=4, hk=2, D=16, layout=layout)
run_rope_backward_cat(rows=3, S=67, hq=3, hk=2, D=12, layout="bshd")  # several programs per range; D/2 not a power of 2
run_adapter_epilogues(N=37, heads=3, kv_heads=1, D=16, I=80, H=96, R=48)
for nested in (True, False):
    # (3, 4096): the last program's tile is partial; (7, 100) and (5, 300): so is the last block
    for shape in ((64, 128), (40, 96), (3, 4096), (7, 100)):
        run_nf4(shape, nested)
    for shape in ((37, 72), (5, 300)):
        run_nf4(shape, nested, blocksize=128)
    # the launch variants that benchmarks/dequant_timing.py sweeps: several programs, a partial last one
    for launch in (T._Nf4Launch(bytes_per_program=1024, vec_bytes=0, stream_out=True),
                   T._Nf4Launch(bytes_per_program=512, lookup="load"), T._Nf4Launch(lookup="table", num_warps=4)):
        run_nf4((9, 1000), nested, launch=launch)
run_nf4((4096, 1024), True)  # as many values as a Llama-3-8B k/v projection: 512 programs

run_nf4_errors()
run_adapter_epilogues(N=70, heads=2, kv_heads=2, D=12, I=52, H=100, R=16)
for r in (8, 16):
    for n in (1, 2, 3):
        run_lora(N=37, H=96, r=r, n=n, p=0.3, seed=1234 + 10 * r + n)
run_lora(N=150, H=296, r=24, n=3, p=0.3, seed=1, splits=3)
run_lora_b_grads(N=37, rows=[32, 16, 16], r=8, launch=T.LoraBGradsLaunch(block_m=16, block_n=16))
run_lora_b_grads(N=70, rows=[64, 32], r=16, launch=T.LoraBGradsLaunch(block_m=32, block_n=32), splits=3)
run_lora_b_grads(N=50, rows=[48], r=24, launch=T.LoraBGradsLaunch(block_m=16, block_n=16, warps=2), splits=1)
run_lora_a_configs(N=37, H=96, r=8, n=1, p=0.3, seed=5)
run_lora_a_configs(N=70, H=104, r=16, n=2, p=0.3, seed=6)
run_lora_a_configs(N=150, H=296, r=24, n=3, p=0.3, seed=7, splits=3)
run_lora_a_configs(N=37, H=96, r=8, n=4, p=0.3, seed=8)  # all_n takes n <= 3: one projection a program
run_masked_backward_launches(N=37, H=96, r=8, n=3, p=0.3, seed=9)  # tokens and widths no tile divides
run_masked_backward_launches(N=150, H=296, r=24, n=2, p=0.3, seed=10)
run_sum_planes(S=3, shape=(37, 48))
run_lora_factors(outs=(40, 8, 8), r=4, in_f=32, out_dtype=torch.float16)  # q, k, v
run_lora_factors(outs=(36, 36), r=8, in_f=20, out_dtype=torch.float16)  # gate, up
run_lora_factors(outs=(5000,), r=4, in_f=3000, out_dtype=torch.float16)  # one projection, several chunks
run_lora_factors(outs=(24, 8), r=4, in_f=16, out_dtype=torch.float32)
raises("lora_factors_", "a bf16 parameter", lambda: T.lora_factors_(
    torch.empty(4, 16, device=DEV), torch.empty(8, 4, device=DEV), [torch.empty(4, 16, device=DEV, dtype=torch.bfloat16)],
    [torch.empty(8, 4, device=DEV)], torch.ones(1, device=DEV)))
run_grads_accumulate(sizes_a=(3 * 4 * 32, 4 * 32), rows_b=(32, 16, 16, 32), rank=4)
run_grads_accumulate(sizes_a=(5000,), rows_b=(700, 300, 20, 1), rank=16)  # several programs, a partial last one
run_sum_planes(S=7, shape=(600, 40))  # more than one program of 1,024 elements
run_lora(N=150, H=296, r=8, n=2, p=0.9, seed=2**45 + 3)
run_cross_entropy(C=6, V=5000, scale=0.25)
run_cross_entropy(C=5, V=77, scale=None)
raises("cross_entropy_rows_", "labels shape", lambda: T.cross_entropy_rows_(rnd(4, 8), torch.zeros(3, dtype=torch.long, device=DEV), 1.0))
raises("cross_entropy_rows_", "tensor scale of two values",
       lambda: T.cross_entropy_rows_(rnd(4, 8), torch.zeros(4, dtype=torch.long, device=DEV),
                                     torch.ones(2, device=DEV)))
if not INTERPRET:
    run_cross_entropy(C=1024, V=151936, scale=1e-3)
    run_dispatch()
    run_elementwise(N=1024, H=1536, I=8960, heads=12, D=128, kept_heads=2)
    for layout in ("separate", "bshd", "bhsd"):
        run_rope_backward_cat(rows=2, S=1023, hq=32, hk=8, D=128, layout=layout)
    run_adapter_epilogues(N=1024, heads=32, kv_heads=8, D=128, I=14336, H=4096, R=48)
    run_lora(N=2048, H=1536, r=16, n=3, p=0.1, seed=99)
    run_lora_b_grads(N=2048, rows=[1536, 256, 256], r=16)
    run_lora_b_grads(N=1000, rows=[8960, 8960], r=16)
    run_lora(N=2048, H=1536, r=64, n=2, p=0.1, seed=99, splits=7)
    run_lora_a_configs(N=2000, H=1000, r=16, n=3, p=0.1, seed=98)
    run_masked_backward_launches(N=2000, H=1000, r=16, n=3, p=0.1, seed=97)
    run_lora_factors(outs=(4096, 1024, 1024), r=16, in_f=4096, out_dtype=torch.bfloat16)  # compiled: bf16 too
    run_lora_factors(outs=(14336, 14336), r=16, in_f=4096, out_dtype=torch.bfloat16)
print("RESULTS_JSON=" + json.dumps(RESULTS))
'''


def _run_child(mode: str) -> list[dict]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(TRAINER_DIR), env.get("PYTHONPATH")) if p)
    if mode == "interpret":
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-c", SCRIPT, mode], env=env, capture_output=True, text=True, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS_JSON=")]
    if proc.returncode != 0 or not lines:
        pytest.fail(f"the {mode} child failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return json.loads(lines[-1][len("RESULTS_JSON="):])


def _describe(entry: dict) -> str:
    parts = [f"{entry['op']} [{entry.get('case', '')}]"]
    if "rel_err" in entry:
        parts.append(f"rel err {entry['rel_err']:.3g} (tol {entry['tol']:.0e})")
    if entry.get("unwritten"):
        parts.append(f"{entry['unwritten']} output elements never written (still NaN)")
    for key in ("error", "detail"):
        if entry.get(key):
            parts.append(entry[key])
    return ": ".join(parts[:1]) + (" -- " + "; ".join(parts[1:]) if parts[1:] else "")


def _assert_group(results: list[dict], prefixes: tuple[str, ...]) -> None:
    group = [e for e in results if e["op"].startswith(prefixes)]
    assert group, f"the child reported nothing for {prefixes}"
    bad = [_describe(e) for e in group if not e["ok"]]
    assert not bad, f"{len(bad)} of {len(group)} checks failed:\n" + "\n".join(bad)


@pytest.fixture(scope="module")
def interpreted() -> list[dict]:
    return _run_child("interpret")


def test_elementwise_kernels_match_the_references(interpreted):
    _assert_group(interpreted, ("rms_norm", "rope_", "swiglu"))


def test_rope_backward_cat_writes_the_qkv_gradient_of_every_attention_layout(interpreted):
    _assert_group(interpreted, ("rope_backward_cat",))


def test_nf4_dequantization_is_bitsandbytes_bit_for_bit(interpreted):
    _assert_group(interpreted, ("dequantize_nf4",))


def test_adapter_epilogue_kernels_match_the_references(interpreted):
    _assert_group(interpreted, ("lora_rope_", "lora_swiglu_", "lora_residual_add", "rms_norm_backward.residual"))


def test_dropout_mask_is_a_pure_function_of_seed_projection_and_position(interpreted):
    _assert_group(interpreted, ("dropout_mask",))


def test_lora_kernels_match_the_formulas_with_the_kernels_mask(interpreted):
    _assert_group(interpreted, ("lora_",))


def test_a_lora_sets_factors_are_refreshed_in_one_launch_bit_for_bit(interpreted):
    _assert_group(interpreted, ("lora_factors_",))


def test_lora_a_split_sums_add_in_order_and_round_once(interpreted):
    _assert_group(interpreted, ("sum_planes",))


def test_cross_entropy_kernel_matches_the_reference(interpreted):
    _assert_group(interpreted, ("cross_entropy_rows_",))


def test_launchers_reject_bad_arguments_with_value_errors(interpreted):
    errors = [e for e in interpreted if "detail" in e and e["op"] in
              ("rms_norm", "rms_norm_backward", "rope_", "rope_backward_cat", "swiglu", "swiglu_backward", "lora_a",
               "lora_a_backward", "lora_x_backward_", "lora_b_grads", "MaskedBackwardLaunch")]
    assert len(errors) == 22
    bad = [_describe(e) for e in errors if not e["ok"]]
    assert not bad, "\n".join(bad)


def _has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


@pytest.mark.skipif(not _has_cuda(), reason="needs a CUDA GPU (compiled kernels, bf16)")
def test_compiled_kernels_on_the_gpu_match_the_references():
    results = _run_child("cuda")
    bad = [_describe(e) for e in results if not e["ok"]]
    assert not bad, f"{len(bad)} of {len(results)} checks failed:\n" + "\n".join(bad)
