"""The kernel-timing loop of the benchmark scripts (lora_a_timing, lora_b_timing, dequant_timing,
attention_timing, epilogue_timing, lora_fold_timing): `calls` calls captured as one CUDA graph and
timed by CUDA events around a replay, over several trials. Graphed, the time is the device's alone: timing eager calls
measures the host's launch cost (~100 us a call whatever the kernel).

The scripts import it as they import each other (their own folder is on the path when they run).
"""

from __future__ import annotations

import time

CALLS = 20


def seconds_per_call(fns, cuda: bool, *, calls: int = CALLS, trials: int = 3, pick=min,
                     graphed: bool = True) -> float:
    """Seconds one call takes: `pick` (the least, or statistics.median) of `trials` timings of
    `calls` calls. `fns` is a callable, or a list of callables that the calls cycle over (copies of
    the inputs, so that they do not stay in L2). Each is called once before anything is timed or
    captured: kernels load, lazy workspaces are allocated. graphed=False: the calls are made
    eagerly between the events (a call that cannot be captured; the launch cost is then counted).
    Without CUDA (a CPU rehearsal, whose numbers mean nothing): one eager call timed on the host."""
    fns = list(fns) if isinstance(fns, list | tuple) else [fns]
    for fn in fns:
        fn()
    if not cuda:
        start = time.perf_counter()
        fns[0]()
        return time.perf_counter() - start
    import torch

    def calls_in_turn():
        for i in range(calls):
            fns[i % len(fns)]()

    run = calls_in_turn
    torch.cuda.synchronize()
    if graphed:
        graph = torch.cuda.CUDAGraph()
        # capture_begin directly: torch.cuda.graph() runs gc.collect() each time
        with torch.cuda.stream(torch.cuda.Stream()):
            graph.capture_begin()
            try:
                calls_in_turn()
            finally:  # a call that fails mid-capture must not leave the capture open
                graph.capture_end()
        torch.cuda.synchronize()
        graph.replay()  # warm-up
        run = graph.replay
    times = []
    for _ in range(trials):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / calls)
    return pick(times)
