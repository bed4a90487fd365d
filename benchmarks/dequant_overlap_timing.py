"""Can the NF4 dequantization hide under the GEMMs? A decoder layer's frozen-weight work at
Llama-3-8B's shapes (a 2 x 1,024-token micro-step), forward then backward, timed four ways:

- "inline": each weight dequantized on the compute stream just before its GEMM (what the fused
  layer does today: benchmarks/NOTES.md, session 17's profile, 16.8 ms a step of NF4 dequant);
- "side": at the layer's start a side stream dequantizes all four weights of the pass in the
  order the GEMMs use them, an event after each; each GEMM waits for its own event (the side
  stream joins before the layer ends, as a per-layer CUDA graph needs);
- "side-hi": the same with the side stream at high priority (its blocks go first when SMs free);
- "copies": the same GEMMs over bf16 weights already in memory (no dequant: the floor).

Between the GEMMs the layer runs what the fused layer runs that is not a GEMM at comparable cost:
cuDNN/flash causal attention (GQA 32/8 heads, 128 wide) forward, an RMSNorm-like fp32 pass and
SwiGLU's element-wise pass. Each case is LAYERS layers captured as one CUDA graph, replayed for
about SECONDS seconds per round so that the card reaches its power-limited clock, rounds
interleaved (inline, side, side-hi, copies, inline, ...); the median of the replays in the last
rounds is reported. The NF4 weights are random bytes with random nested absmax (timing only: the
kernel is triton_ops.dequantize_nf4, the trainer's), one set per layer so nothing stays in L2.

    python benchmarks/dequant_overlap_timing.py --out $OUT        # dequant_overlap.md / .json
    TRITON_INTERPRET=1 python benchmarks/dequant_overlap_timing.py --tiny --out /tmp/x   # CPU rehearsal
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import types
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "trainer_image"))

# Llama-3-8B: hidden 4096, 32 heads of 128, 8 kv heads, MLP 14336; tokens of one micro-step
FULL = dict(hidden=4096, heads=32, kv_heads=8, head_dim=128, mlp=14336, rows=2, seq=1024, layers=8)
TINY = dict(hidden=64, heads=4, kv_heads=2, head_dim=16, mlp=224, rows=1, seq=32, layers=2)
CASES = ("inline", "side", "side-hi", "copies")


def fake_nf4(torch, out_features: int, in_features: int, device):
    """Random packed bytes and a nested (double-quantized) absmax in bitsandbytes' layout, blocksize
    64 and 256: what dequantize_nf4 reads (the values are not a real weight's)."""
    n = out_features * in_features
    q = torch.randint(0, 256, (n // 2,), dtype=torch.uint8, device=device)
    absmax = torch.randint(0, 256, (n // 64,), dtype=torch.uint8, device=device)
    state2 = types.SimpleNamespace(code=torch.linspace(-1, 1, 256, device=device), blocksize=256,
                                   absmax=torch.rand(max(1, n // 64 // 256 + 1), device=device))
    code = torch.tensor([-1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0, 0.0796, 0.1609,
                         0.2461, 0.3379, 0.4407, 0.5626, 0.7230, 1.0], device=device)
    state = types.SimpleNamespace(quant_type="nf4", blocksize=64, nested=True, absmax=absmax, state2=state2,
                                  offset=torch.tensor(0.01, device=device), code=code, shape=(out_features, in_features))
    return q, state


class Layer:
    """One layer's four frozen weights (q|k|v, o, gate|up, down) as NF4 and as bf16 copies."""

    def __init__(self, torch, tri, s: dict, device, dtype):
        h, kv = s["hidden"], s["kv_heads"] * s["head_dim"]
        self.shapes = {"qkv": (h + 2 * kv, h), "o": (h, h), "gu": (2 * s["mlp"], h), "down": (h, s["mlp"])}
        self.nf4 = {k: fake_nf4(torch, *shape, device) for k, shape in self.shapes.items()}
        self.copies = {}
        for k, shape in self.shapes.items():
            w = torch.empty(shape, device=device, dtype=dtype)
            tri.dequantize_nf4(*self.nf4[k], w)
            self.copies[k] = w
        self.torch, self.tri, self.dtype, self.device = torch, tri, dtype, device

    def dequant(self, k):
        out = self.torch.empty(self.shapes[k], device=self.device, dtype=self.dtype)
        self.tri.dequantize_nf4(*self.nf4[k], out)
        return out


def layer_pass(torch, F, layer: Layer, x, s: dict, case: str, side, order):
    """One pass (forward order q|k|v, o, gate|up, down; backward the reverse) of the layer's GEMMs
    with the attention and element-wise work between them."""
    n, h = x.shape
    weights, events = {}, {}
    if case in ("side", "side-hi"):
        main = torch.cuda.current_stream()
        bufs = {k: torch.empty(layer.shapes[k], device=x.device, dtype=x.dtype) for k in order}
        side.wait_stream(main)
        with torch.cuda.stream(side):
            for k in order:
                layer.tri.dequantize_nf4(*layer.nf4[k], bufs[k])
                ev = torch.cuda.Event()
                ev.record(side)
                events[k] = ev
        weights = bufs

    def w(k):
        if case == "copies":
            return layer.copies[k]
        if case == "inline":
            return layer.dequant(k)
        torch.cuda.current_stream().wait_event(events[k])
        return weights[k]

    hd, nh, nkv = s["head_dim"], s["heads"], s["kv_heads"]
    forward = order[0] == "qkv"
    y = None
    for k in order:
        if k == "qkv":
            inp = (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)
            if forward:
                qkv = inp @ w(k).t()
                q = qkv[:, :nh * hd].view(s["rows"], s["seq"], nh, hd).transpose(1, 2)
                kk = qkv[:, nh * hd:(nh + nkv) * hd].view(s["rows"], s["seq"], nkv, hd).transpose(1, 2)
                v = qkv[:, (nh + nkv) * hd:].view(s["rows"], s["seq"], nkv, hd).transpose(1, 2)
                att = F.scaled_dot_product_attention(q, kk, v, is_causal=True, enable_gqa=True)
                y = att.transpose(1, 2).reshape(n, h)
            else:
                gq = torch.empty(n, (nh + 2 * nkv) * hd, device=x.device, dtype=x.dtype).normal_()
                y = gq @ w(k)
        elif k == "o":
            y = (y if y is not None else x) @ w(k).t()
            if not forward:  # attention backward's stand-in: the forward's cost twice over
                q = y.view(s["rows"], s["seq"], nh, hd).transpose(1, 2)
                for _ in range(2):
                    y = F.scaled_dot_product_attention(q, q, q, is_causal=True).transpose(1, 2).reshape(n, h)
        elif k == "gu":
            gu = (y if y is not None else x) @ w(k).t() if forward else None
            if forward:
                g, u = gu.chunk(2, dim=1)
                y = F.silu(g.float()).mul_(u.float()).to(x.dtype)
            else:
                y = torch.empty(n, 2 * s["mlp"], device=x.device, dtype=x.dtype).normal_() @ w(k)
        elif k == "down":
            y = (y if y is not None and y.shape[1] == s["mlp"] else
                 torch.empty(n, s["mlp"], device=x.device, dtype=x.dtype).normal_()) @ w(k).t() if forward \
                else x @ w(k)
    if case in ("side", "side-hi"):
        torch.cuda.current_stream().wait_stream(side)
    return y


def run(s: dict, seconds: float, rounds: int) -> dict:
    import torch
    import torch.nn.functional as F
    from qlora_trainer.acceleration import triton_ops as tri

    cuda = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.manual_seed(0)
    layers = [Layer(torch, tri, s, device, dtype) for _ in range(s["layers"])]
    n = s["rows"] * s["seq"]
    x = torch.randn(n, s["hidden"], device=device, dtype=dtype)
    fwd, bwd = ["qkv", "o", "gu", "down"], ["down", "gu", "o", "qkv"]
    streams = {"side": torch.cuda.Stream(priority=0) if cuda else None,
               "side-hi": torch.cuda.Stream(priority=-1) if cuda else None}

    def program(case):
        def step():
            for layer in layers:
                layer_pass(torch, F, layer, x, s, case, streams.get(case), fwd)
            for layer in reversed(layers):
                layer_pass(torch, F, layer, x, s, case, streams.get(case), bwd)
        return step

    result = {"device": torch.cuda.get_device_name() if cuda else "cpu (Triton interpreter)", "shape": s,
              "cases": {}}
    if not cuda:
        for case in ("inline", "copies"):
            start = time.perf_counter()
            program(case)()
            result["cases"][case] = {"ms_per_layer": (time.perf_counter() - start) * 1e3 / s["layers"]}
        return result
    graphs = {}
    for case in CASES:
        fn = program(case)
        fn()
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.stream(torch.cuda.Stream()):
            g.capture_begin()
            try:
                fn()
            finally:
                g.capture_end()
        torch.cuda.synchronize()
        graphs[case] = g
    times = {c: [] for c in CASES}
    for r in range(rounds):
        for case in CASES:
            g = graphs[case]
            end_at = time.perf_counter() + seconds
            while time.perf_counter() < end_at:
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                g.replay()
                b.record()
                b.synchronize()
                if r >= rounds // 2:
                    times[case].append(a.elapsed_time(b))
    for case in CASES:
        ms = statistics.median(times[case]) / s["layers"]
        result["cases"][case] = {"ms_per_layer": ms, "replays": len(times[case]),
                                 "min_ms_per_layer": min(times[case]) / s["layers"]}
    return result


def table(result: dict) -> str:
    cases = result["cases"]
    floor = cases["copies"]["ms_per_layer"]
    inline = cases["inline"]["ms_per_layer"]
    lines = [f"Device: {result['device']}; one layer's frozen-weight GEMMs, attention and element-wise work, "
             f"forward + backward, {result['shape']['rows']} x {result['shape']['seq']} tokens at Llama-3-8B's "
             "shapes; median of the replays in the later rounds", "",
             "| case | ms a layer (fwd + bwd) | min | dequant time left (ms) | share of inline's dequant hidden |",
             "|---|---|---|---|---|"]
    for case, cell in cases.items():
        left = cell["ms_per_layer"] - floor
        hidden = 1 - left / (inline - floor) if inline > floor else float("nan")
        lines.append(f"| {case} | {cell['ms_per_layer']:.3f} | {cell.get('min_ms_per_layer', cell['ms_per_layer']):.3f} "
                     f"| {left:.3f} | {hidden:.0%} |")
    lines.append("")
    lines.append(f"An 8B step (32 layers x 2 micro-steps): inline's dequant {64 * (inline - floor):.1f} ms; "
                 f"side {64 * (cases['side']['ms_per_layer'] - floor):.1f}; "
                 f"side-hi {64 * (cases['side-hi']['ms_per_layer'] - floor):.1f}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--seconds", type=float, default=6.0, help="replay time per case and round")
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()
    result = run(TINY if args.tiny else FULL, args.seconds, args.rounds)
    args.out.mkdir(parents=True, exist_ok=True)
    text = table(result) if "side" in result["cases"] else json.dumps(result, indent=1)
    (args.out / "dequant_overlap.json").write_text(json.dumps(result, indent=1))
    (args.out / "dequant_overlap.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
