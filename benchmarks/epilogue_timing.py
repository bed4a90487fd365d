"""Kernel time of the two adapter epilogues that ran furthest below the H200's bandwidth in the 8B
profile (results/speed_profile_8b_session11_h200.md): lora_rope_ (q|k|v plus its adapter product,
RoPE, in place; ~47 us a call, 1 TB/s) and lora_swiglu_ (gate|up plus its adapter product, in
place, and SwiGLU's output; ~113 us a call, 2.6 TB/s), each in several tilings
(triton_ops.EpilogueLaunch), at the rows' shapes: Llama-3-8B and Qwen2.5-7B at 2,048-token
micro-batches, Qwen2.5-1.5B at 16,384.

Each case is 20 calls captured as one CUDA graph and timed by CUDA events over a replay (the least
of 3; graph_timing.seconds_per_call), so the host's launch cost is not counted. GB/s counts the
bytes a call must move (q|k|v or gate|up read and written, SwiGLU's output written, the fp32 cos
and sin tables read once), against
a device-to-device copy of as many bytes. Every variant's output is compared with the default
tiling's on the same inputs (max abs difference: the same fp32 arithmetic, only the tensor-core
dot's blocking can differ).

    python benchmarks/epilogue_timing.py --out $OUT       # table.md: us per call, ms per 8B step
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "trainer_image"))

RANK = 16
SKIPPED = object()  # a variant the GPU has not the resources to run
# model: (heads, kv_heads, head_dim, intermediate, tokens per micro-batch, calls per step of each kernel)
SHAPES = {"8b": (32, 8, 128, 14336, 2048, 32 * 2), "7b": (28, 4, 128, 18944, 2048, 28 * 2),
          "1.5b": (12, 2, 128, 8960, 16384, 28 * 1)}
TINY = {"8b": (4, 2, 16, 96, 40, 64), "7b": (4, 1, 16, 80, 33, 56), "1.5b": (3, 1, 16, 64, 50, 28)}  # CPU rehearsal

# name: EpilogueLaunch fields; the first of each kernel is triton_ops' default (lora_rope_: session 17's choice from
# results/epilogue_timing_session17_h200.md, until then m64_h1_w4, and m32_h1_w4 before session 11; lora_swiglu_:
# session 16's, until then m64_n128_w8)
ROPE_VARIANTS = {
    "m64_h12_w8_loop_s3": dict(block_m=64, heads=12, warps=8, heads_loop=True, stages=3),
    "m64_h1_w4": dict(block_m=64, heads=1, warps=4),
    "m32_h1_w4": dict(block_m=32, heads=1, warps=4),
    "m32_h2_w4": dict(block_m=32, heads=2, warps=4),
    "m32_h4_w4": dict(block_m=32, heads=4, warps=4),
    "m32_h8_w4": dict(block_m=32, heads=8, warps=4),
    "m64_h4_w4": dict(block_m=64, heads=4, warps=4),
    "m64_h4_w8": dict(block_m=64, heads=4, warps=8),
    "m16_h4_w4": dict(block_m=16, heads=4, warps=4),
    "m16_h8_w2": dict(block_m=16, heads=8, warps=2),
    # a program's heads in a loop that keeps `stages` heads' loads in flight, the token block's cos,
    # sin and adapter input read once for all of them (session 16; timed in session 17)
    "m32_h6_w4_loop_s2": dict(block_m=32, heads=6, warps=4, heads_loop=True, stages=2),
    "m32_h6_w4_loop_s1": dict(block_m=32, heads=6, warps=4, heads_loop=True, stages=1),
    "m32_h8_w4_loop_s3": dict(block_m=32, heads=8, warps=4, heads_loop=True, stages=3),
    "m32_h12_w4_loop_s2": dict(block_m=32, heads=12, warps=4, heads_loop=True, stages=2),
    "m64_h4_w4_loop_s2": dict(block_m=64, heads=4, warps=4, heads_loop=True, stages=2),
    "m64_h6_w8_loop_s2": dict(block_m=64, heads=6, warps=8, heads_loop=True, stages=2),
    "m16_h12_w4_loop_s2": dict(block_m=16, heads=12, warps=4, heads_loop=True, stages=2),
    "m16_h6_w2_loop_s3": dict(block_m=16, heads=6, warps=2, heads_loop=True, stages=3),
}
SWIGLU_VARIANTS = {
    "m64_n128_w8_p1_s4": dict(block_m=64, block_n=128, warps=8, programs_per_sm=1, stages=4),
    "m64_n128_w8": dict(block_m=64, block_n=128, warps=8),
    "m64_n64_w4": dict(block_m=64, block_n=64, warps=4),
    "m64_n128_w4": dict(block_m=64, block_n=128, warps=4),
    "m128_n64_w8": dict(block_m=128, block_n=64, warps=8),
    "m128_n128_w8": dict(block_m=128, block_n=128, warps=8),
    "m32_n128_w4": dict(block_m=32, block_n=128, warps=4),
    "m32_n256_w8": dict(block_m=32, block_n=256, warps=8),
    "m16_n256_w4": dict(block_m=16, block_n=256, warps=4),
    # persistent programs walking the tiles, the next tiles' loads in flight while one is computed
    # (session 16; lora_rope_ measured slower that way and has no such launch)
    "m64_n128_w8_p1_s2": dict(block_m=64, block_n=128, warps=8, programs_per_sm=1, stages=2),
    "m64_n128_w8_p1_s3": dict(block_m=64, block_n=128, warps=8, programs_per_sm=1, stages=3),
    "m64_n64_w4_p2_s2": dict(block_m=64, block_n=64, warps=4, programs_per_sm=2, stages=2),
    "m64_n64_w4_p3_s2": dict(block_m=64, block_n=64, warps=4, programs_per_sm=3, stages=2),
    "m64_n64_w4_p2_s3": dict(block_m=64, block_n=64, warps=4, programs_per_sm=2, stages=3),
    "m32_n128_w4_p2_s2": dict(block_m=32, block_n=128, warps=4, programs_per_sm=2, stages=2),
    "m64_n128_w8_p2_s1": dict(block_m=64, block_n=128, warps=8, programs_per_sm=2, stages=1),
    "m64_n128_w4_p1_s3": dict(block_m=64, block_n=128, warps=4, programs_per_sm=1, stages=3),
    "m64_n64_w4_p3_s3": dict(block_m=64, block_n=64, warps=4, programs_per_sm=3, stages=3),
    "m64_n64_w4_p2_s4": dict(block_m=64, block_n=64, warps=4, programs_per_sm=2, stages=4),
    "m64_n64_w4_p4_s2": dict(block_m=64, block_n=64, warps=4, programs_per_sm=4, stages=2),
    "m128_n64_w8_p1_s3": dict(block_m=128, block_n=64, warps=8, programs_per_sm=1, stages=3),
    "m32_n128_w4_p3_s3": dict(block_m=32, block_n=128, warps=4, programs_per_sm=3, stages=3),
}


def run_model(name: str, dims, cuda: bool) -> list[dict]:
    import torch
    from graph_timing import seconds_per_call as timed
    from qlora_trainer.acceleration import triton_ops as T
    from triton.runtime.errors import OutOfResources

    heads, kv, d, inter, n, per_step = dims
    dev, dt = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    g = torch.Generator(device=dev).manual_seed(0)

    def rnd(*shape, scale=1.0, dtype=dt):
        return (torch.randn(*shape, generator=g, device=dev) * scale).to(dtype)

    width = (heads + 2 * kv) * d
    a3, b3 = rnd(n, 3 * RANK), torch.block_diag(*[rnd(w, RANK, scale=0.05) for w in (heads * d, kv * d, kv * d)])
    cos, sin = rnd(n, d, dtype=torch.float32), rnd(n, d, dtype=torch.float32)
    qkv = rnd(n, width)
    a2, b2 = rnd(n, 2 * RANK), torch.block_diag(rnd(inter, RANK, scale=0.05), rnd(inter, RANK, scale=0.05))
    gu = rnd(n, 2 * inter)
    size = qkv.element_size()
    rows = []

    def add(kernel, variant, fields, secs, nbytes, diff):
        rows.append({"model": name, "kernel": kernel, "variant": variant, **fields, "us_per_call": secs * 1e6,
                     "ms_per_step": secs * 1e3 * per_step, "gb_per_s": nbytes / secs / 1e9, "max_abs_diff": diff})

    def attempt(call):
        """Run the variant once (its output is the one compared): its result, or SKIPPED (and a
        line on stderr) when it asks for more shared memory or registers than the GPU has, so the
        sweep goes on to the next one."""
        try:
            return call()
        except OutOfResources as e:
            print(f"[epilogue] {name}: skipped, {e}", file=sys.stderr, flush=True)
            return SKIPPED

    rope_bytes = 2 * qkv.numel() * size + 2 * cos.numel() * 4
    default = None
    for variant, fields in ROPE_VARIANTS.items():
        launch = T.EpilogueLaunch(**fields)
        out = qkv.clone()
        if attempt(lambda o=out, lc=launch: T.lora_rope_(o, a3, b3, cos, sin, heads + kv, d, launch=lc)) is SKIPPED:
            add("lora_rope_", variant, fields, float("nan"), rope_bytes, float("nan"))
            continue
        default = out if default is None else default
        work = qkv.clone()
        secs = timed(lambda w=work, lc=launch: T.lora_rope_(w, a3, b3, cos, sin, heads + kv, d, launch=lc), cuda)
        add("lora_rope_", variant, fields, secs, rope_bytes, float((out.float() - default.float()).abs().max()))
    swiglu_bytes = 2 * gu.numel() * size + gu.numel() // 2 * size
    default = None
    for variant, fields in SWIGLU_VARIANTS.items():
        launch = T.EpilogueLaunch(**fields)
        out = gu.clone()
        h = attempt(lambda o=out, lc=launch: T.lora_swiglu_(o, a2, b2, launch=lc))
        if h is SKIPPED:
            add("lora_swiglu_", variant, fields, float("nan"), swiglu_bytes, float("nan"))
            continue
        default = (out, h) if default is None else default
        diff = max(float((out.float() - default[0].float()).abs().max()), float((h.float() - default[1].float()).abs().max()))
        work = gu.clone()
        secs = timed(lambda w=work, lc=launch: T.lora_swiglu_(w, a2, b2, launch=lc), cuda)
        add("lora_swiglu_", variant, fields, secs, swiglu_bytes, diff)
    for kernel, nbytes in (("copy (reference)", rope_bytes), ("copy (reference)", swiglu_bytes)):
        src = torch.empty(nbytes // 2, dtype=torch.uint8, device=dev)
        dst = torch.empty_like(src)
        secs = timed(lambda s=src, t=dst: t.copy_(s), cuda)
        add(kernel, f"{nbytes / 1e6:.0f} MB", {}, secs, nbytes, 0.0)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| model | kernel | tiling | us per call | ms per step | GB/s | max abs diff vs default |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['kernel']} | {r['variant']} | {r['us_per_call']:.1f} | {r['ms_per_step']:.2f} | "
                     f"{r['gb_per_s']:.0f} | {r['max_abs_diff']:.3g} |")
    return "\n".join(lines)


def sweep_main(doc: str, run_model, table, tag: str, shapes: dict = SHAPES, tiny: dict = TINY) -> int:
    """The command line of a per-model timing sweep: `--models`, `--out` (table.md and results.json
    there); the real shapes on a GPU, `tiny` (a CPU rehearsal) elsewhere. `run_model(name, dims,
    cuda)` -> rows, `table(rows)` -> markdown."""
    import torch

    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--models", default=",".join(shapes))
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    dims = shapes if cuda else tiny
    rows = []
    for name in args.models.split(","):
        rows += run_model(name, dims[name], cuda)
        print(f"[{tag}] {name} done", flush=True)
    text = table(rows)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "table.md").write_text(text + "\n")
        env = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "torch": torch.__version__}
        (args.out / "results.json").write_text(json.dumps({"env": env, "rows": rows}, indent=1))
    return 0


def main() -> int:
    return sweep_main(__doc__, run_model, table, "epilogue")


if __name__ == "__main__":
    sys.exit(main())
