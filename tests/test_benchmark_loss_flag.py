"""The speed benchmark's table flags a row whose fast path trains a different model than the plain
recipe: its last loss further from plain's than plain's own seed-to-seed spread (issue 19)."""

import importlib.util
import json
from pathlib import Path

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


def _bench():
    spec = importlib.util.spec_from_file_location("speed_vs_unsloth", BENCHMARKS / "speed_vs_unsloth.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # stdlib imports only at module level: no torch needed
    return module


def _loss_row(table: str, row: str) -> str:
    return next(line for line in table.splitlines() if line.startswith(f"| {row} |") and "->" in line)


def test_the_h100_tables_8b_and_7b_rows_are_flagged_and_a_matching_row_is_not():
    bench = _bench()
    results = json.loads((BENCHMARKS / "results" / "speed_vs_unsloth_h100.json").read_text())["results"]
    table = bench.render(results)
    assert "ours +0.1601 DEPARTS" in _loss_row(table, "8b-1024")  # 10.6987 against plain's 10.5386
    assert "ours +0.0301 DEPARTS" in _loss_row(table, "7b-1024")
    same = [dict(r, losses=list(by_plain)) if r["name"] == "8b-1024/ours" else r for r in results
            for by_plain in [next(x["losses"] for x in results if x["name"] == "8b-1024/plain")]]
    near = [dict(r, losses=r["losses"][:-1] + [r["losses"][-1] + bench.PLAIN_SEED_SPREAD / 2])
            if r["name"] == "8b-1024/ours" else r for r in same]
    assert "ours +0.0000" in _loss_row(bench.render(same), "8b-1024")
    assert f"ours +{bench.PLAIN_SEED_SPREAD / 2:.4f}" in _loss_row(bench.render(near), "8b-1024")
    assert "DEPARTS" not in _loss_row(bench.render(near), "8b-1024").split("ours")[1].split(",")[0]


def test_the_7b_row_is_held_to_its_own_measured_spread():
    """The H200 table's 7B ours (+0.0151) is within the 7B row's own seed spread (0.0215, plain with
    two seeds), its 7B lean (+0.0234) is not; the 8B row keeps the tighter 8B spread."""
    bench = _bench()
    results = json.loads((BENCHMARKS / "results" / "speed_vs_unsloth_h200.json").read_text())["results"]
    row7, row8 = _loss_row(bench.render(results), "7b-1024"), _loss_row(bench.render(results), "8b-1024")
    assert "ours +0.0151," in row7 and "lean +0.0234 DEPARTS" in row7
    assert "ours -0.0074," in row8 and "lean -0.0131 DEPARTS" in row8
