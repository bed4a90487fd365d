"""Would the adapters' B side cost less inside the base GEMM than in an epilogue kernel?

Today a fused layer runs gate|up = h @ W^T, then lora_swiglu_ adds a @ B^T (a = the masked A side,
B the scaled block-diagonal adapter) in fp32 and applies SwiGLU: at 8B ~112 us a call, 2.6 TB/s,
where plain SwiGLU moves its bytes at ~4 TB/s (results/speed_profile_8b_session12_h200.md). q|k|v
likewise: lora_rope_ ~39 us a call against rope alone. Folded, the adapter is K columns more of the
same GEMM: [h | a] @ [W | B]^T sums base and adapter in the GEMM's fp32 accumulator and rounds
once, and the epilogue is the plain one. Backward, [gh | ga] = g @ [W | B] is one GEMM instead of
two. This script times both ways at the benchmark rows' shapes, bf16, rank 16:

- forward, gate|up: "epilogue" (GEMM, lora_swiglu_) against "fold" (a and B copied into the
  extended operands' last columns, GEMM over K + 2r, swiglu), and "fold, K padded to 64";
- forward, q|k|v: (GEMM, lora_rope_) against (copies, GEMM over K + 3r, rope_);
- backward, gate|up: (g @ W, g @ B) against g @ W[:, :K] with the extended rows' stride (the
  x-gradient when W is stored extended) and against one g @ [W | B].

Each case is graph_timing.seconds_per_call (20 calls in one CUDA graph, the least of 3 replays).
The folded outputs are compared with the epilogue's (max abs difference, bf16: one rounding
instead of two).

    python benchmarks/lora_fold_timing.py --out $OUT       # table.md: us per call, ms per step
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "trainer_image"))

RANK = 16
# model: (hidden, heads, kv_heads, head_dim, intermediate, tokens per micro-batch, calls per step)
SHAPES = {"8b": (4096, 32, 8, 128, 14336, 2048, 32 * 2), "7b": (3584, 28, 4, 128, 18944, 2048, 28 * 2),
          "1.5b": (1536, 12, 2, 128, 8960, 16384, 28 * 1)}
TINY = {"8b": (64, 4, 2, 16, 96, 40, 64), "7b": (64, 4, 1, 16, 80, 33, 56), "1.5b": (48, 3, 1, 16, 64, 50, 28)}


def run_model(name: str, dims, cuda: bool) -> list[dict]:
    import torch
    from graph_timing import seconds_per_call as timed
    from qlora_trainer.acceleration import triton_ops as T

    hidden, heads, kv, d, inter, n, per_step = dims
    dev, dt = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    g = torch.Generator(device=dev).manual_seed(0)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=dev) * scale).to(dt)

    rows = []

    def add(part, variant, secs, diff=0.0):
        rows.append({"model": name, "part": part, "variant": variant, "us_per_call": secs * 1e6,
                     "ms_per_step": secs * 1e3 * per_step, "max_abs_diff": diff})

    def extended(x, extra, pad_to=1):
        k = x.shape[1] + extra.shape[1]
        width = -(-k // pad_to) * pad_to
        out = torch.zeros(x.shape[0], width, dtype=x.dtype, device=x.device)
        out[:, :x.shape[1]] = x
        out[:, x.shape[1]:k] = extra
        return out

    h = rnd(n, hidden)
    # gate|up
    W = rnd(2 * inter, hidden, scale=hidden ** -0.5)
    a2 = rnd(n, 2 * RANK)
    B2 = torch.block_diag(rnd(inter, RANK, scale=0.05), rnd(inter, RANK, scale=0.05)).to(dt)

    def epilogue():
        gu = h @ W.t()
        return T.lora_swiglu_(gu, a2, B2)

    reference = epilogue()
    add("gate|up forward", "GEMM + lora_swiglu_", timed(epilogue, cuda))
    for pad in (1, 64):
        Xp, Wp = extended(h, a2, pad), extended(W, B2, pad)

        def fold(Xp=Xp, Wp=Wp):
            Xp[:, hidden:hidden + 2 * RANK].copy_(a2)
            Wp[:, hidden:hidden + 2 * RANK].copy_(B2)
            return T.swiglu(Xp @ Wp.t())

        diff = float((fold().float() - reference.float()).abs().max())
        add("gate|up forward", f"fold (K {Xp.shape[1]}) + swiglu", timed(fold, cuda), diff)
    # q|k|v
    width = (heads + 2 * kv) * d
    Wq = rnd(width, hidden, scale=hidden ** -0.5)
    a3 = rnd(n, 3 * RANK)
    B3 = torch.block_diag(*[rnd(w, RANK, scale=0.05) for w in (heads * d, kv * d, kv * d)]).to(dt)
    cos = torch.randn(n, d, generator=g, device=dev)
    sin = torch.randn(n, d, generator=g, device=dev)

    def qkv_epilogue():
        qkv = h @ Wq.t()
        T.lora_rope_(qkv, a3, B3, cos, sin, heads + kv, d)
        return qkv

    reference = qkv_epilogue()
    add("q|k|v forward", "GEMM + lora_rope_", timed(qkv_epilogue, cuda))
    Xp, Wp = extended(h, a3), extended(Wq, B3)

    def qkv_fold():
        Xp[:, hidden:].copy_(a3)
        Wp[:, hidden:].copy_(B3)
        qkv = Xp @ Wp.t()
        T.rope_(qkv.view(n, heads + 2 * kv, d)[:, :heads + kv], cos, sin)
        return qkv

    diff = float((qkv_fold().float() - reference.float()).abs().max())
    add("q|k|v forward", f"fold (K {Xp.shape[1]}) + rope_", timed(qkv_fold, cuda), diff)
    # gate|up backward: the x-gradient and the adapter's a-gradient
    ggu = rnd(n, 2 * inter, scale=0.01)
    Wp = extended(W, B2)
    add("gate|up backward", "g @ W, g @ B", timed(lambda: (ggu @ W, ggu @ B2), cuda))
    add("gate|up backward", "g @ W (extended rows), g @ B", timed(lambda: (ggu @ Wp[:, :hidden], ggu @ B2), cuda))
    add("gate|up backward", "g @ [W | B]", timed(lambda: ggu @ Wp, cuda))
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| model | part | variant | us per call | ms per step | max abs diff vs the first |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['part']} | {r['variant']} | {r['us_per_call']:.1f} | {r['ms_per_step']:.2f} | "
                     f"{r['max_abs_diff']:.3g} |")
    return "\n".join(lines)


def main() -> int:
    from epilogue_timing import sweep_main

    return sweep_main(__doc__, run_model, table, "fold", SHAPES, TINY)


if __name__ == "__main__":
    sys.exit(main())
