"""Kernel time of the masked LoRA A side's forward (triton_ops.lora_a, with its split-K sum) against
its A gradient (lora_a_backward), which makes the same Philox draws over the same reads of x, at
the Llama-3-8B layer's four projection groups (2,048 tokens, r 16, dropout 0.05).

Each case is 20 calls captured as one CUDA graph (device seeds, as the trainer's graphed layers
use them) and timed by CUDA events over one replay: kernel time without the host's launch cost
(timing eager calls measures the launch: ~100 us a call whatever the kernel).

    python benchmarks/lora_a_timing.py --out $OUT      # table.md: microseconds per call
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "trainer_image"))

GROUPS = (("qkv", 3, 4096), ("o_proj", 1, 4096), ("gate_up", 2, 4096), ("down", 1, 14336))
TOKENS, RANK, P, CALLS = 2048, 16, 0.05, 20


def _graph_us(fn) -> float:
    import torch

    fn()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(CALLS):
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    end.synchronize()
    return round(start.elapsed_time(end) / CALLS * 1000, 1)


def timings() -> dict:
    """{group: {case: microseconds per call}}; cases: lora_a at its default split, at session 9's
    (about 2 programs per SM), at 2x and 4x the default, the split-K sum alone, lora_a_backward."""
    import torch
    import triton
    from qlora_trainer.acceleration import triton_ops as tri

    bf = dict(device="cuda", dtype=torch.bfloat16)
    seed = torch.tensor([7], dtype=torch.int64, device="cuda")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    out = {}
    for group, n, h in GROUPS:
        x, A = torch.randn(TOKENS, h, **bf), torch.randn(n * RANK, h, **bf) * 0.05
        ga = torch.randn(TOKENS, n * RANK, **bf)
        pairs = n * triton.cdiv(TOKENS, 64)
        default = triton.cdiv(tri._LORA_A_PROGRAMS_PER_SM * sms, pairs)
        k_cap = triton.cdiv(triton.cdiv(h, 64), 2)
        s9 = min(triton.cdiv(2 * sms, pairs), triton.cdiv(triton.cdiv(h, 64), 4))
        row = {}
        for name, splits in (("lora_a", None), ("lora_a_s9split", s9), ("lora_a_2x", min(2 * default, k_cap)),
                             ("lora_a_4x", min(4 * default, k_cap))):
            row[name] = _graph_us(lambda s=splits: tri.lora_a(x, A, seed, P, n, splits=s))  # noqa: B023
        planes = torch.randn(min(default, k_cap), TOKENS, n * RANK, device="cuda")
        row["sum_planes"] = _graph_us(lambda: tri._sum_planes(planes, torch.bfloat16))  # noqa: B023
        row["lora_a_backward"] = _graph_us(lambda: tri.lora_a_backward(ga, x, seed, P, n))  # noqa: B023
        out[group] = row
    return out


def table(result: dict) -> str:
    cases = list(next(iter(result.values())))
    lines = ["| us per call | " + " | ".join(cases) + " |", "|---|" + "---|" * len(cases)]
    for group, row in result.items():
        lines.append(f"| {group} | " + " | ".join(f"{row[c]:.1f}" for c in cases) + " |")
    per_layer = {c: sum(r[c] for r in result.values()) for c in cases}
    lines.append("| per layer (4 groups) | " + " | ".join(f"{per_layer[c]:.1f}" for c in cases) + " |")
    lines.append("| per 8B step (x 64, ms) | " + " | ".join(f"{per_layer[c] * 64 / 1000:.2f}" for c in cases) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "out"))
    args = parser.parse_args()
    result = timings()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "lora_a_timing.json").write_text(json.dumps(result, indent=1))
    text = table(result)
    (out / "table.md").write_text(text)
    print(text, flush=True)


if __name__ == "__main__":
    main()
