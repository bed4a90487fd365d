"""Kernel time of the NF4 dequantization (triton_ops.dequantize_nf4) at Llama-3-8B's projection
shapes (blocksize 64, double-quantized absmax with blocksize2 256, quantized by bitsandbytes on
the GPU): session 10's kernel (a copy below, one gathered absmax a byte, 1,024 bytes a program),
the current one in several launch shapes (triton_ops._Nf4Launch), bitsandbytes' own
dequantize_4bit, and a torch copy of the same output as the bandwidth reference.

Each case is CALLS calls captured as one CUDA graph and timed by CUDA events over REPLAYS replays
(the median; graph_timing.seconds_per_call): kernel time without the host's launch cost. The
calls cycle over enough copies of the packed weight and of the output that they do not stay in L2
(as in a training step, where a GEMM runs between two dequantizations). TB/s counts what a call must move: 0.5 B a value read,
the output written, the absmax (and nested absmax) read; the copy counts its read and its write.
bitsandbytes runs eagerly (events around CALLS calls), the others graphed.
Every case's output is compared bit for bit with bitsandbytes' dequantize_4bit on the same GPU.

    python benchmarks/dequant_timing.py --out $OUT           # dequant_timing.md / .json
    TRITON_INTERPRET=1 python benchmarks/dequant_timing.py --tiny --out /tmp/x   # CPU rehearsal

The device image lacks bitsandbytes: the carried .gpu_carry/site.tar.xz (benchmarks/gpu_carry.py)
is unpacked and put on the path first, as speed_vs_unsloth.py does.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "trainer_image"))
sys.path.insert(0, str(HERE))

# Llama-3-8B's projections as [out, in]; each is dequantized 3 times a step (forward, the
# checkpointed recompute, backward) in each of 32 layers: 672 launches a step (the session-10 profile)
PROJECTIONS = {"q": (4096, 4096), "k": (1024, 4096), "v": (1024, 4096), "o": (4096, 4096),
               "gate": (14336, 4096), "up": (14336, 4096), "down": (4096, 14336)}
CALLS_PER_STEP = 3 * 32
TINY = {"q": (64, 64), "k": (16, 64), "v": (16, 64), "o": (64, 64), "gate": (224, 64), "up": (224, 64),
        "down": (64, 224)}
CALLS, REPLAYS = 20, 15
L2_FLUSH_BYTES = 256 << 20  # the copies a graph cycles over move at least this much (H200 L2: 50 MB)

# name: triton_ops._Nf4Launch fields, all given, so that a name keeps its meaning when the default
# changes ("new" is the default launch: code_v4_b4096_w8_cs)
VARIANTS = {"new": {}}
for _lookup, _vec, _bytes, _warps, _cs in (
        ("code", 4, 1024, 4, False), ("code", 4, 2048, 4, False), ("code", 4, 2048, 8, False),
        ("code", 4, 4096, 4, False), ("code", 4, 8192, 8, False), ("code", 4, 4096, 8, True),
        ("code", 4, 4096, 8, False),
        ("code", 0, 4096, 8, False),  # 16-byte loads: the fastest of the first call's layouts
        ("load", 4, 1024, 4, False), ("load", 4, 2048, 4, False), ("load", 4, 4096, 8, False),
        ("load", 4, 8192, 8, False), ("load", 0, 1024, 4, False),
        ("table", 4, 4096, 8, False), ("table", 0, 2048, 4, False)):
    VARIANTS[f"{_lookup}_v{_vec or 16}_b{_bytes}_w{_warps}" + ("_cs" if _cs else "")] = dict(
        lookup=_lookup, vec_bytes=_vec, bytes_per_program=_bytes, num_warps=_warps, stream_out=_cs)


def _import_stack():
    """torch, triton_ops, bitsandbytes.functional and the old kernel's launcher."""
    from speed_vs_unsloth import prepare_site

    site = prepare_site()
    if site:
        sys.path.insert(0, site)
    import bitsandbytes.functional as bnbf
    import torch
    import triton
    import triton.language as tl
    from qlora_trainer.acceleration import triton_ops as tri

    @triton.jit
    def _old_dequantize_nf4_kernel(q_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, code_ptr, out_ptr,
                                   n_bytes, BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr,
                                   NESTED: tl.constexpr, BLOCK: tl.constexpr):
        # session 10's kernel, verbatim: the baseline
        pid = tl.program_id(0).to(tl.int64)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        inside = offs < n_bytes
        q = tl.load(q_ptr + offs, mask=inside, other=0).to(tl.int32)
        hi = tl.load(code_ptr + (q >> 4))
        lo = tl.load(code_ptr + (q & 15))
        blk = (offs * 2) // BLOCKSIZE
        if NESTED:
            aq = tl.load(absmax_ptr + blk, mask=inside, other=0).to(tl.int32)
            am = tl.load(code2_ptr + aq) * tl.load(absmax2_ptr + blk // BLOCKSIZE2, mask=inside, other=0.0)
            am = am + tl.load(offset_ptr)
        else:
            am = tl.load(absmax_ptr + blk, mask=inside, other=0.0)
        vals = tl.reshape(tl.join(hi * am, lo * am), (2 * BLOCK,))
        outs = pid * 2 * BLOCK + tl.arange(0, 2 * BLOCK)
        tl.store(out_ptr + outs, vals.to(out_ptr.dtype.element_ty), mask=outs < 2 * n_bytes)

    def old_dequantize(q, state, out):
        n = out.numel()
        if state.nested:
            s2 = state.state2
            absmax, code2, absmax2, bs2 = state.absmax, s2.code, s2.absmax, s2.blocksize
            offset = state.offset.to(device=q.device, dtype=torch.float32).reshape(1)
        else:
            absmax = code2 = absmax2 = offset = state.absmax
            bs2 = 1
        code = state.code.to(device=q.device, dtype=torch.float32)
        _old_dequantize_nf4_kernel[(triton.cdiv(n // 2, 1024),)](
            q, absmax, code2, absmax2, offset, code, out, n // 2, BLOCKSIZE=state.blocksize, BLOCKSIZE2=bs2,
            NESTED=bool(state.nested), BLOCK=1024, num_warps=4, enable_fp_fusion=False)

    return torch, tri, bnbf, old_dequantize


def _time_ms(fns, dev, graphed: bool = True) -> float:
    """Median ms of one call over REPLAYS timings of CALLS calls, the calls cycling over fns (one per
    copy). Not graphed: the calls are made eagerly (bitsandbytes allocates its nested absmax in each
    call)."""
    from graph_timing import seconds_per_call

    return seconds_per_call(fns, dev == "cuda", calls=CALLS, trials=REPLAYS, pick=statistics.median,
                            graphed=graphed) * 1e3


def measure(shapes: dict, variants: dict, nested_only_default: bool = True) -> dict:
    torch, tri, bnbf, old_dequantize = _import_stack()
    dev = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
    dt = torch.bfloat16 if dev == "cuda" else torch.float32  # the interpreter rounds to bf16 by truncation
    result = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu (Triton interpreter)",
              "dtype": str(dt), "cases": {}, "errors": []}
    cases = {"old": lambda q, qs, out: old_dequantize(q, qs, out)}
    for name, fields in variants.items():
        launch = tri._Nf4Launch(**fields)
        cases[name] = lambda q, qs, out, launch=launch: tri.dequantize_nf4(q, qs, out, _launch=launch)
    cases["bitsandbytes"] = lambda q, qs, out: bnbf.dequantize_4bit(q, qs, out=out)
    g = torch.Generator(device=dev).manual_seed(0)
    for nested in (True, False):
        for shape in dict.fromkeys(shapes.values()):
            key = f"{shape[0]}x{shape[1]} nested={int(nested)}"
            result["cases"][key] = _measure_shape(torch, bnbf, cases, dev, dt, g, shape, nested, result["errors"])
            if dev == "cuda":
                torch.cuda.empty_cache()
    return result


def _measure_shape(torch, bnbf, cases, dev, dt, g, shape, nested, errors) -> dict:
    """{"values", "bytes", "copies", case: {"ms", "tb_s", "bit_equal"}} of one weight shape."""
    key = f"{shape[0]}x{shape[1]} nested={int(nested)}"
    w = (torch.randn(shape, generator=g, device=dev) * 0.02).to(dt)
    q, qs = bnbf.quantize_4bit(w, quant_type="nf4", compress_statistics=nested, blocksize=64)
    expected = bnbf.dequantize_4bit(q, qs)
    n = w.numel()
    absmax_bytes = qs.absmax.numel() * qs.absmax.element_size()
    if nested:
        absmax_bytes += qs.state2.absmax.numel() * 4
    moved = n // 2 + n * w.element_size() + absmax_bytes
    copies = max(1, min(32, math.ceil(L2_FLUSH_BYTES / moved))) if dev == "cuda" else 1
    packed = [q.clone() for _ in range(copies)]
    outs = [torch.empty(shape, device=dev, dtype=dt) for _ in range(copies)]
    row = {"values": n, "bytes": moved, "copies": copies}
    for name, fn in cases.items():
        if not nested and name not in ("old", "new", "bitsandbytes"):
            continue
        try:
            outs[0].fill_(float("nan"))
            fn(q, qs, outs[0])
            equal = bool(torch.equal(outs[0], expected))
            calls = [lambda fn=fn, p=p, o=o: fn(p, qs, o) for p, o in zip(packed, outs)]
            ms = _time_ms(calls, dev, graphed=name != "bitsandbytes")
            row[name] = {"ms": ms, "tb_s": moved / ms / 1e9, "bit_equal": equal}
        except Exception as e:  # noqa: BLE001 -- reported in the table, the sweep goes on
            errors.append(f"{key} {name}: {type(e).__name__}: {str(e)[:300]}")
        print(key, name, row.get(name), flush=True)
    src = torch.empty(shape, device=dev, dtype=dt).normal_()
    dsts = [torch.empty_like(src) for _ in range(max(1, copies // 2))]
    ms = _time_ms([lambda d=d: d.copy_(src) for d in dsts], dev)
    row["torch copy"] = {"ms": ms, "tb_s": 2 * n * w.element_size() / ms / 1e9}
    return row


def step_ms(result: dict, shapes: dict, case: str, nested: int = 1) -> float | None:
    """Predicted ms a step of this case's dequantizations (672 launches: 96 a projection)."""
    total = 0.0
    for shape in shapes.values():
        cell = result["cases"].get(f"{shape[0]}x{shape[1]} nested={nested}", {}).get(case)
        if cell is None:
            return None
        total += cell["ms"] * CALLS_PER_STEP
    return total


def table(result: dict, shapes: dict) -> str:
    keys = list(result["cases"])
    names = []
    for row in result["cases"].values():
        names += [k for k, v in row.items() if isinstance(v, dict) and k not in names]
    head = [k.replace(" nested=", " n") for k in keys]
    lines = [f"Device: {result['device']}, output {result['dtype']}; cells: us a call (TB/s); "
             f"8B step: {CALLS_PER_STEP} calls of each of Llama-3-8B's 7 projections (nested)", "",
             "| case | " + " | ".join(head) + " | 8B step ms | vs old ms | bit-equal to bitsandbytes |",
             "|---|" + "---|" * (len(head) + 3)]
    old = step_ms(result, shapes, "old")
    for name in names:
        cells, equal = [], []
        for key in keys:
            cell = result["cases"][key].get(name)
            cells.append("-" if cell is None else f"{cell['ms'] * 1000:.1f} ({cell['tb_s']:.2f})")
            if cell is not None and "bit_equal" in cell:
                equal.append(cell["bit_equal"])
        step = step_ms(result, shapes, name)
        delta = f"{step - old:+.2f}" if step is not None and old is not None and name != "torch copy" else "-"
        eq = "-" if not equal else ("yes" if all(equal) else "NO")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {'-' if step is None else f'{step:.2f}'} | {delta} | {eq} |")
    if result["errors"]:
        lines.append("")
        lines += [f"- not run: {e}" for e in result["errors"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "out"))
    parser.add_argument("--tiny", action="store_true", help="CPU rehearsal shapes (TRITON_INTERPRET=1)")
    parser.add_argument("--only-default", action="store_true", help="old, new, bitsandbytes and the copy alone")
    args = parser.parse_args()
    shapes = TINY if args.tiny else PROJECTIONS
    variants = {"new": {}} if args.only_default else VARIANTS
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    result = measure(shapes, variants)
    result.update(shapes={k: list(v) for k, v in shapes.items()}, variants=variants, calls=CALLS, replays=REPLAYS,
                  seconds=round(time.monotonic() - t0, 1))
    for case in ("old", "new"):
        result[f"step_ms_{case}"] = step_ms(result, shapes, case)
    (out / "dequant_timing.json").write_text(json.dumps(result, indent=1))
    text = table(result, shapes)
    (out / "dequant_timing.md").write_text(text)
    print(text, flush=True)


if __name__ == "__main__":
    main()
