"""A fixed memory plan for the fast path's CPU tests: two micro-rows, every layer's weights cached,
cross entropy in 7-token chunks; the tests vary the recompute and switches with dataclasses.replace."""

from __future__ import annotations


def fixed_plan(recompute_layers: int = 0, recompute: str = "none"):
    from qlora_trainer.acceleration.planner import MemoryPlan

    return MemoryPlan(micro_batch=2, grad_accum=1, recompute=recompute, recompute_layers=recompute_layers,
                      cached_layers=2, ce_chunk_tokens=7, packing=True, predicted_peak_bytes=0,
                      predicted_tokens_per_s=0.0, budget_bytes=0, policy="test")
