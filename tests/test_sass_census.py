"""The masked LoRA kernels, compiled by Triton for sm_90 (H100/H200) on this CPU, move x in 16-byte
vectors (benchmarks/sass_census.py). lora_a once loaded it one 2-byte element at a time because its
split start was not known to be aligned, and ran at half lora_a_backward's rate over the same tiles
on the H200 (benchmarks/NOTES.md, "Session 12"): this fails if either kernel goes back to that."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "sass_census.py"
WIDE = ("LDGSTS.E.BYPASS.128", "LDGSTS.E.128", "LDG.E.128")
NARROW = ("LDG.E.U16", "LDG.E.U8", "LDG.E.S16", "LDGSTS.E.U16")


@pytest.fixture(scope="module")
def counts() -> dict:
    done = subprocess.run([sys.executable, str(SCRIPT), "--json"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("kernel", ["lora_a", "lora_a_backward", "lora_x_backward_"])
def test_masked_lora_kernels_load_in_16_byte_vectors_not_element_by_element(counts, kernel):
    ops = counts[kernel]["ops"]
    narrow = {op: n for op, n in ops.items() if op.startswith(NARROW)}
    assert not narrow, f"{kernel} loads global memory in 1-2 byte pieces: {narrow} (all: {ops})"
    assert any(ops.get(op, 0) for op in WIDE), f"{kernel} has no 16-byte global loads: {ops}"


def test_lora_a_holds_no_more_registers_than_its_gradient_kernel_needs(counts):
    """245 registers a thread (two programs an SM) went with the element-by-element loads; aligned,
    the forward needs about what lora_a_backward does over the same tiles."""
    assert counts["lora_a"]["registers"] <= 128, counts["lora_a"]
    assert counts["lora_a"]["registers"] <= 2 * counts["lora_a_backward"]["registers"], counts


def test_swiglu_epilogue_keeps_its_next_tiles_loads_in_flight(counts):
    """lora_swiglu_'s default launch walks tiles in a loop that Triton software-pipelines: gate|up
    tiles arrive by asynchronous 16-byte copies (cp.async, LDGSTS) while the tile before is computed.
    One tile a program, loaded then waited for, ran at 2.7 TB/s where the pipelined loop runs at 3.5
    (benchmarks/results/epilogue_timing_session16_h200.md): this fails if the loop stops being
    pipelined (a launch change, a Triton that no longer pipelines it)."""
    ops = counts["lora_swiglu_"]["ops"]
    assert ops.get("LDGSTS.E.BYPASS.128", 0) + ops.get("LDGSTS.E.128", 0) >= 16, ops
    assert not {op: n for op, n in ops.items() if op.startswith(NARROW)}, ops
