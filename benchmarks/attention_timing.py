"""Attention kernels at the speed benchmark's shapes: forward and backward time and their results
against the fused layer's FlashAttention-2 varlen call (issue 19 part 3).

    python3 benchmarks/attention_timing.py --out $OUT        # one GPU: table.md + attention_timing.json
    python3 benchmarks/attention_timing.py --dry-run         # CPU: builds every case at tiny shapes

Each case is one micro-step of a benchmark row as the planner runs it (rows of equal length, causal,
bf16), plus a packed case of records of different lengths. q, k, v are [N, heads, D] views of one
qkv buffer, as in the fused layer. Candidates (each from the tokens' views to [N, heads, D] results,
the layout glue included):
- fa2-varlen: torch.ops.torch_attn._varlen_attn(_backward) (FlashAttention-2), what runs today;
- cudnn-rows: the trainer's attention.py for fixed-length rows (cuDNN's fused flash attention,
  [rows, heads, S, D] views of the buffer, native GQA);
- cudnn-rows-expand: the same with k and v repeated to q's heads (dk, dv summed back);
- cudnn-ragged (--with-ragged only): aten._cudnn_attention_forward/_backward over cumulative
  lengths (packed, ragged); it crashed the process on the H200 (an illegal memory access);
- fa3-varlen: fa2-varlen after torch.nn.attention.activate_flash_attention_impl("FA3"), if it loads.
Times: --reps calls captured as one CUDA graph, timed by CUDA events around a replay, the median
of --trials (graph_timing.seconds_per_call; eager calls between the events where a capture
fails). Errors: max |x - FA2's x| of the output and the three gradients, and each candidate's and
FA2's max error against an fp32 reference (SDPA math per row).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "trainer_image"))

# name: (q heads, kv heads, head dim, records, record length). The micro-steps the planner picks
# (results/speed_vs_unsloth_h200_session19.json: micro_batch 4 / 8 at 1.5B, 2 x accumulation 2 at 7B and 8B).
CASES = {
    "8b-1024": (32, 8, 128, [1024] * 2),
    "7b-1024": (28, 4, 128, [1024] * 2),
    "1.5b-512": (12, 2, 128, [512] * 4),
    "1.5b-2048": (12, 2, 128, [2048] * 8),
    "8b-packed": (32, 8, 128, [700, 300, 512, 236, 300]),  # records of different lengths, 2,048 tokens
}
DRY = {name: (hq, hk, 16, [max(4, n // 128) for n in lens]) for name, (hq, hk, _, lens) in CASES.items()}


def make_case(hq, hk, d, lens, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    n = sum(lens)
    qkv = torch.randn(n, (hq + 2 * hk) * d, generator=g).to(device=device, dtype=torch.bfloat16)
    heads = qkv.view(n, hq + 2 * hk, d)
    q, k, v = heads[:, :hq], heads[:, hq:hq + hk], heads[:, hq + hk:]
    grad = (torch.randn(n, hq, d, generator=g) * 0.1).to(device=device, dtype=torch.bfloat16)
    cu = torch.tensor([0] + lens, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(device)
    return q, k, v, grad, cu, max(lens)


# -- candidates: fwd(q, k, v, cu, max_len, scale) -> (out, state); bwd(g, q, k, v, out, state, cu, max_len, scale)


def fa2_fwd(q, k, v, cu, max_len, scale):
    from torch.nn.attention import varlen  # noqa: F401  (registers torch_attn ops)

    out, lse, rng = torch.ops.torch_attn._varlen_attn(q, k, v, cu, cu, max_len, max_len, True, scale, [-1, 0])
    return out, (lse, rng)


def fa2_bwd(g, q, k, v, out, state, cu, max_len, scale):
    lse, rng = state
    return torch.ops.torch_attn._varlen_attn_backward(g, q, k, v, out, lse, cu, cu, max_len, max_len, True, rng,
                                                     scale, [-1, 0])


def rows_fwd(q, k, v, cu, max_len, scale):
    from qlora_trainer.acceleration import attention

    rows = attention.equal_rows(q.shape[0], cu, max_len)
    if not rows:
        raise ValueError("records of different lengths")
    out, lse, cq, ck, _, _, seed, offset, _ = torch.ops.aten._scaled_dot_product_cudnn_attention(
        attention._rows(q, rows), attention._rows(k, rows), attention._rows(v, rows), None, True, 0.0, True, False,
        scale=scale)
    return attention._tokens(out), attention._CudnnState((lse, seed, offset, cq, ck, rows))


def rows_bwd(g, q, k, v, out, state, cu, max_len, scale):
    from qlora_trainer.acceleration import attention

    return attention.backward(g, q, k, v, out, state, cu, max_len, scale)


def expand_fwd(q, k, v, cu, max_len, scale):
    rep = q.shape[1] // k.shape[1]
    ke, ve = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    out, state = rows_fwd(q, ke, ve, cu, max_len, scale)
    return out, (state, ke, ve)


def expand_bwd(g, q, k, v, out, state, cu, max_len, scale):
    state, ke, ve = state
    dq, dk, dv = rows_bwd(g, q, ke, ve, out, state, cu, max_len, scale)
    n, hk, d = k.shape
    return dq, dk.reshape(n, hk, -1, d).sum(2), dv.reshape(n, hk, -1, d).sum(2)


def ragged_fwd(q, k, v, cu, max_len, scale):
    res = torch.ops.aten._cudnn_attention_forward(q, k, v, None, cu, cu, max_len, max_len, True, 0.0, True, False,
                                                 scale=scale)
    return res[0], (res[1], res[6], res[7])


def ragged_bwd(g, q, k, v, out, state, cu, max_len, scale):
    lse, seed, offset = state
    return torch.ops.aten._cudnn_attention_backward(g, q, k, v, out, lse, seed, offset, None, cu, cu, max_len,
                                                   max_len, 0.0, True, scale=scale)


CANDIDATES = {
    "fa2-varlen": (fa2_fwd, fa2_bwd),
    "cudnn-rows": (rows_fwd, rows_bwd),
    "cudnn-rows-expand": (expand_fwd, expand_bwd),
}
# On request only (--with-ragged): on the H200 (torch 2.11, cuDNN 9.19) its first call at the 8B case
# hit an illegal memory access, which leaves the process's CUDA context unusable for what follows.
RAGGED = {"cudnn-ragged": (ragged_fwd, ragged_bwd)}


def reference(q, k, v, grad, lens, scale):
    """fp32 SDPA (math) per record: out, dq, dk, dv."""
    leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
    outs, start = [], 0
    for n in lens:
        qi, ki, vi = (t[start:start + n].transpose(0, 1) for t in leaves)
        rep = qi.shape[0] // ki.shape[0]
        ki, vi = ki.repeat_interleave(rep, 0), vi.repeat_interleave(rep, 0)
        with sdpa_kernel(SDPBackend.MATH) if q.is_cuda else _null():
            outs.append(F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, scale=scale).transpose(0, 1))
        start += n
    out = torch.cat(outs, 0)
    grads = torch.autograd.grad(out, leaves, grad.float())
    return [out.detach(), *grads]


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def timed(fn, trials, reps, graphs: bool):
    """Median ms per call of fn over `trials` timings of `reps` calls: captured as one CUDA graph and
    replayed, or (graphs False) made eagerly, between CUDA events (graph_timing.seconds_per_call)."""
    from graph_timing import seconds_per_call

    return seconds_per_call(fn, True, calls=reps, trials=trials, pick=statistics.median, graphed=graphs) * 1e3


def flops(hq, d, lens):
    """Causal attention FLOPs: forward 2 GEMMs, backward 5 (half of each score matrix)."""
    pairs = sum(n * (n + 1) / 2 for n in lens)
    fwd = 4 * hq * d * pairs
    return fwd, 2.5 * fwd


def run_case(name, spec, device, trials, reps, graphs):
    hq, hk, d, lens = spec
    scale = d ** -0.5
    q, k, v, grad, cu, max_len = make_case(hq, hk, d, lens, device)
    ref = reference(q, k, v, grad, lens, scale) if device.type == "cuda" or len(lens) < 64 else None
    fl_fwd, fl_bwd = flops(hq, d, lens)
    rows, base = [], None
    for cand, (fwd, bwd) in CANDIDATES.items():
        row = dict(case=name, candidate=cand, tokens=sum(lens), records=len(lens), max_len=max_len)
        try:
            if device.type != "cuda":  # dry run: build the case only
                row["note"] = "dry run (no CUDA)"
                rows.append(row)
                continue
            out, state = fwd(q, k, v, cu, max_len, scale)
            dq, dk, dv = bwd(grad, q, k, v, out, state, cu, max_len, scale)
            dq2 = bwd(grad, q, k, v, out, state, cu, max_len, scale)[0]
            res = [t.float() for t in (out, dq, dk, dv)]
            row["bwd_bitwise_repeatable"] = bool(torch.equal(dq, dq2))
            if cand == "fa2-varlen":
                base = res
            if base is not None:
                row["max_diff_vs_fa2"] = dict(zip(("out", "dq", "dk", "dv"),
                                                  (float((a - b).abs().max()) for a, b in zip(res, base))))
            if ref is not None:
                row["max_err_vs_fp32"] = dict(zip(("out", "dq", "dk", "dv"),
                                                  (float((a - b).abs().max()) for a, b in zip(res, ref))))
            for mode in ((True, False) if graphs else (False,)):
                try:
                    row["fwd_ms"] = timed(functools.partial(fwd, q, k, v, cu, max_len, scale), trials, reps, mode)
                    row["bwd_ms"] = timed(functools.partial(bwd, grad, q, k, v, out, state, cu, max_len, scale),
                                          trials, reps, mode)
                    row["timing"] = "cuda graph" if mode else "eager"
                    break
                except Exception as exc:  # noqa: BLE001  (a capture that fails: eager times, said so)
                    row["graph_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
                    torch.cuda.synchronize()
            row["fwd_tflops"] = fl_fwd / row["fwd_ms"] / 1e9
            row["bwd_tflops"] = fl_bwd / row["bwd_ms"] / 1e9
        except Exception as exc:  # noqa: BLE001  (a candidate that cannot run here is a row that says why)
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def try_fa3(device, trials, reps, graphs):
    """fa2-varlen's call after activating FlashAttention-3, if this torch can (it needs a package)."""
    try:
        from torch.nn.attention import activate_flash_attention_impl, restore_flash_attention_impl
    except ImportError as exc:
        return [dict(case="8b-1024", candidate="fa3-varlen", error=f"ImportError: {exc}")]
    try:
        activate_flash_attention_impl("FA3")
    except Exception as exc:  # noqa: BLE001
        return [dict(case="8b-1024", candidate="fa3-varlen", error=f"{type(exc).__name__}: {str(exc)[:200]}")]
    try:
        saved = dict(CANDIDATES)
        CANDIDATES.clear()
        CANDIDATES["fa3-varlen"] = saved["fa2-varlen"]
        return [dict(r, candidate="fa3-varlen") for r in run_case("8b-1024", CASES["8b-1024"], device, trials,
                                                                  reps, graphs)]
    finally:
        CANDIDATES.clear()
        CANDIDATES.update(saved)
        restore_flash_attention_impl()


def table(rows) -> str:
    def err(r, key):
        e = r.get(key)
        return "-" if not e else "{:.1e} / {:.1e} / {:.1e} / {:.1e}".format(*e.values())

    base = {r["case"]: r for r in rows if r["candidate"] == "fa2-varlen" and "fwd_ms" in r}
    lines = ["| case (tokens, records) | candidate | fwd ms | bwd ms | fwd+bwd ms | vs FA2 | fwd / bwd TFLOP/s "
             "| max diff vs FA2 (out/dq/dk/dv) | max err vs fp32 (out/dq/dk/dv) | bwd repeatable | timing |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        head = f"{r['case']} ({r.get('tokens', '?')}, {r.get('records', '?')})"
        if "fwd_ms" not in r:
            lines.append(f"| {head} | {r['candidate']} | - | - | - | - | - | - | - | - | "
                         f"{r.get('error') or r.get('note', '')} |")
            continue
        tot = r["fwd_ms"] + r["bwd_ms"]
        b = base.get(r["case"])
        ratio = f"{(b['fwd_ms'] + b['bwd_ms']) / tot:.2f}x" if b else "-"
        lines.append(f"| {head} | {r['candidate']} | {r['fwd_ms']:.3f} | {r['bwd_ms']:.3f} | {tot:.3f} | {ratio} | "
                     f"{r['fwd_tflops']:.0f} / {r['bwd_tflops']:.0f} | {err(r, 'max_diff_vs_fa2')} | "
                     f"{err(r, 'max_err_vs_fp32')} | {r.get('bwd_bitwise_repeatable')} | {r['timing']}"
                     f"{' (' + r['graph_error'] + ')' if r.get('graph_error') else ''} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT"), help="folder for attention_timing.{md,json}")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes; on the CPU only build the cases")
    ap.add_argument("--trials", type=int, default=7)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--no-graphs", action="store_true")
    ap.add_argument("--with-ragged", action="store_true", help="also cudnn-ragged, last (it may crash the process)")
    args = ap.parse_args(argv)
    if args.with_ragged:
        CANDIDATES.update(RAGGED)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cases = DRY if args.dry_run else CASES
    t0 = time.time()
    env = dict(torch=torch.__version__, cuda=torch.version.cuda,
               cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
               device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu")
    print(json.dumps(env), flush=True)
    rows = []
    for name, spec in cases.items():
        rows += run_case(name, spec, device, args.trials, args.reps, not args.no_graphs)
    if device.type == "cuda" and not args.dry_run:
        rows += try_fa3(device, args.trials, args.reps, not args.no_graphs)
    md = (f"torch {env['torch']}, CUDA {env['cuda']}, cuDNN {env['cudnn']}, {env['device']}; "
          f"median of {args.trials} trials x {args.reps} calls; {time.time() - t0:.0f} s\n\n" + table(rows) + "\n")
    print(md, flush=True)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "attention_timing.md").write_text(md)
        (out / "attention_timing.json").write_text(json.dumps({"env": env, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
