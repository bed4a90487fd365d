"""Kernel time of the masked LoRA A side's forward (triton_ops.lora_a, with its split-K sum) in
several launch shapes, against its gradients (lora_a_backward makes the same Philox draws over
the same reads of x), at the four projection groups of a decoder layer (r 16, dropout 0.05):
Llama-3-8B and Qwen2.5-7B at 2,048-token micro-batches, Qwen2.5-1.5B at 16,384 (the 1.5b-2048
row's micro-batch of 8 x 2,048).

Each case is 20 calls captured as one CUDA graph (device seeds, as the trainer's graphed layers
use them) and timed by CUDA events over a replay (the least of 3; graph_timing.seconds_per_call):
kernel time without the host's launch cost (timing eager calls measures the launch: ~100 us a call
whatever the kernel). The same x is read by every call, so it is partly L2-resident, as it is for
the backward rows.

Every variant's output is compared with the session-9 launch shape's (max abs diff): the
keep-mask is the same function, only the order of the fp32 sums differs. The two gradient
kernels' launch variants (BACKWARD_VARIANTS, session 12) are timed and compared the same way
against their default launches (the reference rows). The variants compile in
parallel worker processes first (Triton's cache on disk), so the timing process only loads them.

    python benchmarks/lora_a_timing.py --out $OUT      # table.md: ms per step, us per 8B call
    python benchmarks/lora_a_timing.py --only s9,lora_a_backward,lora_x_backward_ --out $OUT
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "trainer_image"))

RANK, P = 16, 0.05
# model: (hidden, intermediate, tokens per micro-batch, lora_a calls per group per step)
SHAPES = {"8b": (4096, 14336, 2048, 32 * 2), "7b": (3584, 18944, 2048, 28 * 2), "1.5b": (1536, 8960, 16384, 28 * 1)}
TINY = {"8b": (256, 512, 130, 64), "7b": (192, 320, 70, 56), "1.5b": (128, 256, 200, 28)}  # CPU rehearsal


def groups(hidden: int, inter: int):
    """(name, projections sharing the input, input width) of one decoder layer."""
    return (("qkv", 3, hidden), ("o_proj", 1, hidden), ("gate_up", 2, hidden), ("down", 1, inter))


# name: LoraAConfig fields (the default LoraAConfig() is "s9": session 9's launch)
VARIANTS = {
    "s9": {},
    "s9_pps8": dict(programs_per_sm=8),
    "s9_pps2": dict(programs_per_sm=2),
    "w8": dict(num_warps=8),
    "st2": dict(num_stages=2),
    "st4": dict(num_stages=4),
    "k128": dict(block_k=128),
    "k128_w8": dict(block_k=128, num_warps=8),
    "m128": dict(block_m=128),
    "m128_w8": dict(block_m=128, num_warps=8),
    "m128_k128_w8": dict(block_m=128, block_k=128, num_warps=8),
    "T": dict(transposed=True),
    "T_st2": dict(transposed=True, num_stages=2),
    "T_st4": dict(transposed=True, num_stages=4),
    "T_w8": dict(transposed=True, num_warps=8),
    "T_k128": dict(transposed=True, block_k=128),
    "T_m128": dict(transposed=True, block_m=128),
    "T_m128_w8": dict(transposed=True, block_m=128, num_warps=8),
    "T_pps8": dict(transposed=True, programs_per_sm=8),
    "T_pps2": dict(transposed=True, programs_per_sm=2),
    "N": dict(all_n=True),
    "N_w8": dict(all_n=True, num_warps=8),
    "N_m128_w8": dict(all_n=True, block_m=128, num_warps=8),
    "NT": dict(all_n=True, transposed=True),
    "NT_w8": dict(all_n=True, transposed=True, num_warps=8),
    "NT_pps8": dict(all_n=True, transposed=True, programs_per_sm=8),
    "NT_k128": dict(all_n=True, transposed=True, block_k=128),
    "NT_m128_w8": dict(all_n=True, transposed=True, block_m=128, num_warps=8),
}
REFERENCE_ROWS = ("sum_planes", "lora_a_backward", "lora_x_backward_")
# name: (kernel, MaskedBackwardLaunch fields) of the two gradient kernels ("ab" lora_a_backward,
# "xb" lora_x_backward_), each against its default launch (the reference row of its kernel)
BACKWARD_VARIANTS = {
    "ab_w8": ("ab", dict(block_m=64, block_h=64, warps=8)),
    "ab_h128": ("ab", dict(block_m=64, block_h=128)),
    "ab_h128_w8": ("ab", dict(block_m=64, block_h=128, warps=8)),
    "ab_m128_w8": ("ab", dict(block_m=128, block_h=64, warps=8)),
    "ab_st2": ("ab", dict(block_m=64, block_h=64, stages=2)),
    "ab_st4": ("ab", dict(block_m=64, block_h=64, stages=4)),
    "ab_pps8": ("ab", dict(block_m=64, block_h=64, programs_per_sm=8)),
    "ab_pps2": ("ab", dict(block_m=64, block_h=64, programs_per_sm=2)),
    "xb_w8": ("xb", dict(block_m=64, block_h=128, warps=8, stages=2)),
    "xb_h64": ("xb", dict(block_m=64, block_h=64, stages=2)),
    "xb_h64_w8": ("xb", dict(block_m=64, block_h=64, warps=8, stages=2)),
    "xb_m128_w8": ("xb", dict(block_m=128, block_h=64, warps=8, stages=2)),
    "xb_m128_h128_w8": ("xb", dict(block_m=128, block_h=128, warps=8, stages=2)),
    "xb_h256_w8": ("xb", dict(block_m=64, block_h=256, warps=8, stages=2)),
    "xb_st1": ("xb", dict(block_m=64, block_h=128, stages=1)),
    "xb_st3": ("xb", dict(block_m=64, block_h=128, stages=3)),
    "xb_m32": ("xb", dict(block_m=32, block_h=128, stages=2)),
}
_BACKWARD_REFERENCE = {"ab": "lora_a_backward", "xb": "lora_x_backward_"}
# Edge cases against a float64 reference made from dropout_mask: (tokens, width, r, n), token
# counts and widths that no tile divides, r not a power of two and below the 16-wide dot.
EDGES = ((1000, 1000, 8, 1), (1000, 1000, 8, 2), (300, 520, 24, 3), (130, 4104, 16, 3))
EDGES_TINY = ((70, 104, 8, 1), (37, 96, 24, 3))  # the CPU rehearsal's (Triton's interpreter is slow)


def edge_error(torch, tri, dev, dt, cfg) -> float:
    """The largest relative error (norm) of lora_a under `cfg` over EDGES."""
    worst = 0.0
    for tokens, h, r, n in (EDGES if dev == "cuda" else EDGES_TINY):
        g = torch.Generator().manual_seed(tokens + h)
        x = torch.randn(tokens, h, generator=g).to(dev, dt)
        A = (torch.randn(n * r, h, generator=g) * 0.1).to(dev, dt)
        xd, Ad = x.double().cpu(), A.double().cpu()
        expected = torch.cat([(xd * tri.dropout_mask(3, j, tokens, h, 0.3, dev).cpu().double())
                              @ Ad[j * r:(j + 1) * r].t() for j in range(n)], dim=1)
        out = tri.lora_a(x, A, 3, 0.3, n, config=cfg).double().cpu()
        worst = max(worst, float((out - expected).norm() / expected.norm()))
    return worst


def _setup():
    import torch

    if os.environ.get("TRITON_INTERPRET") == "1":
        from qlora_trainer.acceleration.triton_interpreter import allow_scalar_loop_bounds

        allow_scalar_loop_bounds()  # numpy >= 2.4 under Triton's interpreter
        return torch, "cpu", torch.float32
    return torch, "cuda", torch.bfloat16


def _inputs(torch, dev, dt, tokens, n, h, seed=0):
    g = torch.Generator(device=dev).manual_seed(seed)  # drawn where they live: 1.5B's x is 147M values
    x = torch.randn(tokens, h, generator=g, device=dev).to(dt)
    A = (torch.randn(n * RANK, h, generator=g, device=dev) * 0.05).to(dt)
    ga = torch.randn(tokens, n * RANK, generator=g, device=dev).to(dt)
    return x, A, ga


def _case_fn(name, tri, torch, dev, dt, x, A, ga, seed, n):
    """The call that case `name` times, on these inputs."""
    import triton

    if name in VARIANTS:
        cfg = tri.LoraAConfig(**VARIANTS[name])
        return lambda: tri.lora_a(x, A, seed, P, n, config=cfg)
    if name == "sum_planes":  # the planes of the default split
        tokens, h = x.shape
        pairs = n * triton.cdiv(tokens, 64)
        planes = max(1, min(triton.cdiv(tri._LORA_A_PROGRAMS_PER_SM * tri._num_sms(x.device), pairs),
                            triton.cdiv(triton.cdiv(h, 64), 2)))
        parts = torch.randn(planes, tokens, n * RANK, device=dev)
        return lambda: tri._sum_planes(parts, dt)
    launch = None
    if name in BACKWARD_VARIANTS:
        kind, fields = BACKWARD_VARIANTS[name]
        name, launch = _BACKWARD_REFERENCE[kind], tri.MaskedBackwardLaunch(**fields)
    if name == "lora_a_backward":
        return lambda: tri.lora_a_backward(ga, x, seed, P, n, launch=launch)
    gx = torch.zeros_like(x)  # each call adds into it: a new case's first call gives the result alone

    def x_backward():
        tri.lora_x_backward_(gx, ga, A, seed, P, n, launch=launch)
        return gx
    return x_backward


def _worker(cases: list[str], shapes: dict, barrier, lock, rows_path: str) -> None:
    """Compile this worker's cases on every group shape (with few tokens: token counts do not
    specialize the kernels) in parallel with the other workers, and check them on EDGES; once
    every worker has compiled (barrier), time them on the GPU one worker at a time (lock), kernels
    already loaded in this process. Each result is one JSON line appended to rows_path."""

    def emit(entry: dict) -> None:
        with open(rows_path, "a") as f:
            f.write(json.dumps(entry) + "\n")
        print(json.dumps(entry), flush=True)

    ok = []
    try:  # whatever fails here, the barrier is reached: a broken worker must not leave the others waiting
        torch, dev, dt = _setup()
        from graph_timing import seconds_per_call
        from qlora_trainer.acceleration import triton_ops as tri

        seed = torch.tensor([7], dtype=torch.int64, device=dev)
        ok = list(cases)
        for hidden, inter, _, _ in shapes.values():
            for _, n, h in groups(hidden, inter):
                x, A, ga = _inputs(torch, dev, dt, 256, n, h)
                tri.lora_a(x, A, seed, P, n)  # the reference (session 9's launch), in every worker
                for name in list(ok):
                    try:
                        _case_fn(name, tri, torch, dev, dt, x, A, ga, seed, n)()
                    except Exception as e:  # noqa: BLE001 -- reported in the table, the sweep goes on
                        emit({"case": name, "error": f"{type(e).__name__}: {str(e)[:300]}"})
                        ok.remove(name)
        for name in ok:
            if name in VARIANTS:
                emit({"case": name, "edge_rel_err": edge_error(torch, tri, dev, dt, tri.LoraAConfig(**VARIANTS[name]))})
    except Exception as e:  # noqa: BLE001
        emit({"case": ",".join(cases), "error": f"worker: {type(e).__name__}: {str(e)[:300]}"})
        ok = []
    finally:
        barrier.wait()
    if not ok:
        return
    with lock:
        for model, (hidden, inter, tokens, _) in shapes.items():
            for group, n, h in groups(hidden, inter):
                x, A, ga = _inputs(torch, dev, dt, tokens, n, h)
                ref = tri.lora_a(x, A, seed, P, n).float()
                refs = {kind: _case_fn(row, tri, torch, dev, dt, x, A, ga, seed, n)().float().clone()
                        for kind, row in _BACKWARD_REFERENCE.items()}
                for name in ok:
                    fn = _case_fn(name, tri, torch, dev, dt, x, A, ga, seed, n)
                    entry = {"case": name, "model": model, "group": group}
                    if name in VARIANTS:
                        entry["diff"] = float((fn().float() - ref).abs().max())
                    elif name in BACKWARD_VARIANTS:
                        entry["diff"] = float((fn().float() - refs[BACKWARD_VARIANTS[name][0]]).abs().max())
                    entry["us"] = round(seconds_per_call(fn, dev == "cuda") * 1e6, 1)
                    emit(entry)
        if dev == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()


def timings(shapes: dict, workers: int, rows_path: Path, only: list[str] | None = None) -> dict:
    """{"models": {model: {group: {case: {"us": ..., "diff": ...}}}}, "edge_rel_err": {case: ...},
    "errors": [...]} from the workers' JSON lines; cases: the VARIANTS of lora_a, then the split-K
    sum alone and the two gradient kernels (REFERENCE_ROWS)."""
    t0 = time.monotonic()
    cases = list(VARIANTS) + list(REFERENCE_ROWS) + list(BACKWARD_VARIANTS)
    if only:
        unknown = sorted(set(only) - set(cases))
        if unknown:
            raise SystemExit(f"unknown cases {unknown}; known: {cases}")
        cases = [c for c in cases if c in only]
    workers = max(1, min(workers, len(cases)))
    chunks = [cases[i::workers] for i in range(workers)]
    rows_path.write_text("")
    ctx = multiprocessing.get_context("spawn")
    barrier, lock = ctx.Barrier(workers), ctx.Lock()
    procs = [ctx.Process(target=_worker, args=(c, shapes, barrier, lock, str(rows_path))) for c in chunks]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join()
    print(f"all workers done in {time.monotonic() - t0:.0f} s", flush=True)
    return collect(rows_path.read_text().splitlines(), shapes)


def collect(lines: list[str], shapes: dict) -> dict:
    result = {"errors": [], "edge_rel_err": {}, "models": {}}
    for line in lines:
        e = json.loads(line)
        if "error" in e:
            result["errors"].append(f"{e['case']}: {e['error']}")
        elif "edge_rel_err" in e:
            result["edge_rel_err"][e["case"]] = e["edge_rel_err"]
        else:
            cell = {k: e[k] for k in ("us", "diff") if k in e}
            result["models"].setdefault(e["model"], {}).setdefault(e["group"], {})[e["case"]] = cell
    order = list(VARIANTS) + list(REFERENCE_ROWS) + list(BACKWARD_VARIANTS)
    result["models"] = {m: {g: dict(sorted(row.items(), key=lambda kv: order.index(kv[0])))
                            for g, row in result["models"][m].items()}
                        for m in shapes if m in result["models"]}
    return result


def table(result: dict, shapes: dict) -> str:
    models = result["models"]
    first = next(iter(models.values()))
    cases = list(first["qkv"])
    group_names = list(first)
    head = ([f"8b {g} us" for g in group_names] if "8b" in models else []) + [f"{m} ms/step" for m in models]
    lines = ["| case | " + " | ".join(head) + " | vs default, 8b ms | max abs diff vs default | edge rel err |",
             "|---|" + "---|" * (len(head) + 3)]

    def step_ms(model, case):
        per_layer = sum(models[model][g][case]["us"] for g in models[model] if case in models[model][g])
        return per_layer * shapes[model][3] / 1000

    for case in cases:
        if any(case not in models[m][g] for m in models for g in models[m]):
            continue
        cells = [f"{models['8b'][g][case]['us']:.1f}" for g in group_names] if "8b" in models else []
        cells += [f"{step_ms(m, case):.2f}" for m in models]
        base = "s9" if case in VARIANTS else _BACKWARD_REFERENCE.get(BACKWARD_VARIANTS.get(case, ("",))[0])
        known = "8b" in models and base is not None and all(base in row for row in models["8b"].values())
        delta = f"{step_ms('8b', case) - step_ms('8b', base):+.2f}" if known else "-"
        diffs = [models[m][g][case].get("diff") for m in models for g in models[m]]
        diff = f"{max(diffs):.2g}" if None not in diffs else "-"
        edge = result["edge_rel_err"].get(case)
        edge = "-" if edge is None else f"{edge:.2g}"
        lines.append(f"| {case} | " + " | ".join(cells) + f" | {delta} | {diff} | {edge} |")
    if result["errors"]:
        lines.append("")
        lines += [f"- not run: {e}" for e in result["errors"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "out"))
    parser.add_argument("--workers", type=int, default=min(14, len(VARIANTS)))
    parser.add_argument("--tiny", action="store_true", help="CPU rehearsal shapes (TRITON_INTERPRET=1)")
    parser.add_argument("--only", help="comma-separated cases (VARIANTS, REFERENCE_ROWS, BACKWARD_VARIANTS)")
    parser.add_argument("--rows", help="only make the table from this rows.jsonl (a call cut short)")
    args = parser.parse_args()
    shapes = TINY if args.tiny else SHAPES
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.rows:
        result = collect(Path(args.rows).read_text().splitlines(), shapes)
    else:
        only = args.only.split(",") if args.only else None
        result = timings(shapes, args.workers, out / "rows.jsonl", only)
    result["shapes"] = shapes
    result["variants"] = {k: dataclasses.asdict(_config(v)) for k, v in VARIANTS.items()}
    (out / "lora_a_timing.json").write_text(json.dumps(result, indent=1))
    text = table(result, shapes)
    (out / "table.md").write_text(text)
    print(text, flush=True)


def _config(fields: dict):
    from qlora_trainer.acceleration import triton_ops as tri

    return tri.LoraAConfig(**fields)


if __name__ == "__main__":
    main()
