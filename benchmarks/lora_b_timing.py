"""Kernel time of the LoRA B side's backward products: triton_ops.lora_b_grads (ga = g @ B and each
projection's gB_j = g_j^T @ a_j from one read of the set's output gradient g) in several launch
shapes, against what it replaces (the torch GEMMs the fused layer ran: g @ B, then one g_j^T @ a_j
per projection), at the four projection groups of a decoder layer (r 16): Llama-3-8B and
Qwen2.5-7B at 2,048-token micro-batches, Qwen2.5-1.5B at 16,384.

Timing: graph_timing.seconds_per_call (20 calls in one CUDA graph, the least of 3 replays). Every variant's two
outputs are compared with the GEMMs' (max abs difference, fp32 against the GEMMs' bf16-rounded
outputs).

    python benchmarks/lora_b_timing.py --out $OUT      # table.md: us per 8B call, ms per step
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "trainer_image"))

from graph_timing import seconds_per_call  # noqa: E402  (one timing loop for the kernel sweeps)

RANK = 16
# model: (q width, kv width, hidden, intermediate, tokens per micro-batch, calls per group per step)
SHAPES = {"8b": (4096, 1024, 4096, 14336, 2048, 32 * 2), "7b": (3584, 512, 3584, 18944, 2048, 28 * 2),
          "1.5b": (1536, 256, 1536, 8960, 16384, 28 * 1)}
TINY = {"8b": (256, 128, 256, 512, 70, 64)}  # CPU rehearsal (TRITON_INTERPRET=1)
# name: LoraBGradsLaunch fields (the first: the default)
VARIANTS = {
    "m64_n128": {},
    "m32_n128": dict(block_m=32),
    "m128_n128_w8": dict(block_m=128, warps=8),
    "m64_n256_w8": dict(block_n=256, warps=8),
    "m64_n128_st2": dict(stages=2),
    "m64_n128_st4": dict(stages=4),
    "m64_n128_pps2": dict(programs_per_sm=2),
    "m64_n128_pps8": dict(programs_per_sm=8),
    "m64_n128_w8": dict(warps=8),
}


def groups(q: int, kv: int, hidden: int, inter: int):
    """(name, output rows of each projection) of a decoder layer's LoRA sets."""
    return (("qkv", [q, kv, kv]), ("o_proj", [hidden]), ("gate_up", [inter, inter]), ("down", [hidden]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "out"))
    parser.add_argument("--tiny", action="store_true", help="CPU rehearsal shapes (TRITON_INTERPRET=1)")
    args = parser.parse_args()
    import torch
    from qlora_trainer.acceleration import triton_ops as tri

    dev = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
    dt = torch.float32 if dev == "cpu" else torch.bfloat16
    shapes = TINY if args.tiny else SHAPES
    variants = {k: tri.LoraBGradsLaunch(**v) if not args.tiny else tri.LoraBGradsLaunch(block_m=16, block_n=64, **{
        f: x for f, x in v.items() if f not in ("block_m", "block_n")}) for k, v in VARIANTS.items()}
    rows_out = {}
    for model, (q, kv, hidden, inter, tokens, _) in shapes.items():
        for group, rows in groups(q, kv, hidden, inter):
            cell = time_group(torch, tri, dev, dt, tokens, rows, variants)
            rows_out.setdefault(model, {})[group] = cell
            print(json.dumps({"model": model, "group": group, **cell}), flush=True)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "lora_b_timing.json").write_text(json.dumps({"shapes": shapes, "models": rows_out}, indent=1))
    text = table(rows_out, shapes)
    (out_dir / "table.md").write_text(text)
    print(text, flush=True)


def time_group(torch, tri, dev, dt, tokens: int, rows: list[int], variants: dict) -> dict:
    """{case: {"us", "diff"}} for one LoRA set: the GEMMs it replaces, then each launch variant."""
    n, W = len(rows), sum(rows)
    gen = torch.Generator(device=dev).manual_seed(W + n)
    g = torch.randn(tokens, W, generator=gen, device=dev).to(dt)
    a = torch.randn(tokens, n * RANK, generator=gen, device=dev).to(dt)
    B = torch.block_diag(*[torch.randn(m, RANK, device=dev) * 0.05 for m in rows]).to(dt)
    sinks = [torch.empty(m, RANK, device=dev, dtype=dt) for m in rows]
    starts = [sum(rows[:j]) for j in range(n)]

    def gemms():
        ga = g @ B
        for j, (s0, m) in enumerate(zip(starts, rows)):
            torch.mm(g[:, s0:s0 + m].t(), a[:, j * RANK:(j + 1) * RANK], out=sinks[j])
        return ga

    ga_ref = gemms().float()
    gb_ref = torch.cat(sinks).float()
    cell = {"gemms": {"us": round(seconds_per_call(gemms, dev == "cuda") * 1e6, 1)}}
    out = torch.empty(W, RANK, device=dev)
    for name, launch in variants.items():
        def fused(launch=launch):
            return tri.lora_b_grads(g, a, B, rows, out=out, launch=launch)[0]
        ga = fused().float()
        diff = max(float((ga - ga_ref).abs().max()), float((out - gb_ref).abs().max()))
        cell[name] = {"us": round(seconds_per_call(fused, dev == "cuda") * 1e6, 1), "diff": diff}
    return cell


def table(models: dict, shapes: dict) -> str:
    first = next(iter(models.values()))
    group_names = list(first)
    cases = list(first[group_names[0]])
    ref_model = "8b" if "8b" in models else next(iter(models))
    lines = ["| case | " + " | ".join(f"{ref_model} {g} us" for g in group_names) + " | "
             + " | ".join(f"{m} ms/step" for m in models) + f" | vs GEMMs, {ref_model} ms | max abs diff |",
             "|---|" + "---|" * (len(group_names) + len(models) + 2)]

    def step_ms(model, case):
        return sum(models[model][g][case]["us"] for g in models[model]) * shapes[model][5] / 1000

    for case in cases:
        cells = [f"{models[ref_model][g][case]['us']:.1f}" for g in group_names]
        cells += [f"{step_ms(m, case):.2f}" for m in models]
        delta = "-" if case == "gemms" else f"{step_ms(ref_model, case) - step_ms(ref_model, 'gemms'):+.2f}"
        diffs = [models[m][g][case].get("diff") for m in models for g in models[m]]
        diff = "-" if None in diffs else f"{max(diffs):.2g}"
        lines.append(f"| {case} | " + " | ".join(cells) + f" | {delta} | {diff} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
