"""The CLI speed benchmark's table (benchmarks/trainer_cli_speed.py) says MISSED where the CLI is
below 95% of the benchmark's fast path or a phase is more than 1.5x its floor, and compares a
download only where the model was downloaded (issue 19)."""

from pathlib import Path

from support.benchmarks import load_benchmark

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


def _bench():
    return load_benchmark("trainer_cli_speed")


def _results(cli_tps: float, download_s: float, store: str = "s3") -> dict:
    row = {"bench": "1.5b-2048", "shape": "qwen2.5-1.5b", "seq": 2048, "batch": 8, "accum": 1, "data": "fixed",
           "store": store}
    phases = {"startup": {"seconds": 9.0}, "downloadModel": {"seconds": download_s, "bytes": 3_000_000_000},
              "quantize": {"seconds": 12.0}, "tokenize": {"seconds": 1.0}, "train": {"seconds": 20.0},
              "evalBefore": {"seconds": 0.3}, "evalAfter": {"seconds": 0.2},
              "publish": {"seconds": 0.4, "bytes": 100_000_000}}
    return {
        "floors": {"startup": {"seconds": 8.0},
                   "download": {"qwen2.5-1.5b": {"seconds": 10.0, "megabytes_per_second": 300.0}},
                   "upload": {"qwen2.5-1.5b": {"seconds": 10.0, "bytes": 3_000_000_000}},
                   "quantize": {"qwen2.5-1.5b": {"seconds": 10.0, "params_per_second": 1.5e8}}},
        "rows": {"1.5b-2048": {"row": row, "fast_path": {"tokens_per_s": 50_000.0},
                               "tokenize_floor": {"seconds": 0.8},
                               "cli": {"ok": True, "steady_tokens_per_s": cli_tps, "wall_s": 45.0, "phases": phases}}},
    }


def _line(table: str, *starts: str) -> str:
    return next(line for line in table.splitlines() if line.startswith("| " + " | ".join(starts) + " |"))


def test_rows_and_phases_within_their_targets_pass():
    table, ok = _bench().render(_results(cli_tps=48_000.0, download_s=14.0))
    assert ok, table
    assert _line(table, "1.5b-2048", "48000.0").endswith("| 0.960 | met |")
    assert "| 1.40x | met |" in _line(table, "1.5b-2048", "downloadModel")
    assert "| 0.40 | 0.33 | 1.20x | met |" in _line(table, "1.5b-2048", "publish")  # 100 MB at 300 MB/s


def test_a_slow_cli_or_a_slow_phase_is_missed():
    bench = _bench()
    table, ok = bench.render(_results(cli_tps=47_000.0, download_s=14.0))
    assert not ok and _line(table, "1.5b-2048", "47000.0").endswith("| 0.940 | MISSED |")
    table, ok = bench.render(_results(cli_tps=48_000.0, download_s=16.0))
    assert not ok and "| 1.60x | MISSED |" in _line(table, "1.5b-2048", "downloadModel")


def test_a_pvc_model_has_no_download_to_compare():
    table, _ = _bench().render(_results(cli_tps=48_000.0, download_s=16.0, store="pvc"))
    assert not any(line.startswith("| 1.5b-2048 | downloadModel |") for line in table.splitlines())


def test_the_quantize_diagnostics_sit_beside_the_floor_and_the_fresh_tokenize_floor_is_shown():
    results = _results(cli_tps=48_000.0, download_s=14.0)
    results["floors"]["quantize"]["qwen2.5-1.5b"].update(
        again=10.5, pinned={"seconds": 13.0, "pin_s": 0.1}, trainer_load={"seconds": [14.0, 12.5]})
    results["rows"]["1.5b-2048"]["tokenize_floor"]["fresh_process"] = {"seconds": 0.9}
    results["rows"]["1.5b-2048"]["cli"]["phases"].update(fromPretrained={"seconds": 11.0},
                                                         prepareKbit={"seconds": 0.5})
    table, _ = _bench().render(results)
    assert _line(table, "1.5b-2048", "10.0", "10.5") == "| 1.5b-2048 | 10.0 | 10.5 | 13.0 (0.1) | 14.00, 12.50 | 11.50 |"
    # Taken, the fresh process's first pass is the floor (the CLI's pass is its process's first too).
    tokenize = _line(table, "1.5b-2048", "tokenize")
    assert tokenize.startswith("| 1.5b-2048 | tokenize | 1.00 | 0.90 | 1.11x | met |"), tokenize
    assert "in the driver's warm process 800.0 ms (1.25x)" in tokenize


def test_the_publish_phase_is_compared_with_its_own_files_uploaded_again_with_one_put_beside():
    """With the same files' plain upload measured (publish_floor), the publish phase is judged
    against it, not against the base's upload rate; one PUT per file and that rate are shown."""
    results = _results(cli_tps=48_000.0, download_s=14.0)
    results["rows"]["1.5b-2048"]["publish_floor"] = {
        "seconds": 0.25, "by_strategy": {"one PUT": 0.2, "trainer's parts": 0.25}, "bytes": 100_000_000, "files": 6}
    table, ok = _bench().render(results)
    line = _line(table, "1.5b-2048", "publish")
    assert line.startswith("| 1.5b-2048 | publish | 0.40 | 0.25 | 1.60x | MISSED |"), line
    assert "one PUT per file 0.20 s (2.00x)" in line and "at the base's upload rate 0.33 s" in line
    assert not ok
    assert len([x for x in table.splitlines() if x.startswith("| 1.5b-2048 | publish |")]) == 1


def _recorded(name: str) -> dict:
    import json

    return json.loads((BENCHMARKS / "results" / name).read_text())


def test_session_18s_cli_tables_render_from_their_raw_results():
    """Session 18, the final tree: the CLI at 0.978-1.026 of the fast path on the three fixed-length
    rows (2.05x on the packed one, whose rows the CLI fills fuller); one phase missed, the 7B
    publish at 1.57x its floor (0.66 s against 0.42), and met on the rerun of that row (1.16x)."""
    bench = _bench()
    table, ok = bench.render(_recorded("trainer_cli_speed_session18_h200.json"))
    assert not ok
    for row, ratio in (("8b-1024", "0.978"), ("7b-1024", "1.011"), ("1.5b-2048", "1.026"), ("varlen", "2.046")):
        assert next(line for line in table.splitlines() if line.startswith(f"| {row} | ") and "| met |" in line
                    and f"| {ratio} |" in line)
    missed = [line for line in table.splitlines() if "MISSED" in line]
    assert len(missed) == 1 and "| 0.66 | 0.42 | 1.57x | MISSED |" in _line(table, "7b-1024", "publish")
    again, _ = bench.render(_recorded("trainer_cli_speed_session18b_h200.json"))
    assert "| 0.62 | 0.53 | 1.16x | met |" in _line(again, "7b-1024", "publish")
    assert _line(again, "7b-1024", "16820.9").endswith("| 1.010 | met |")
    assert not [line for line in again.splitlines() if "MISSED" in line]


def test_session_19s_cli_under_memory_max_renders_from_its_raw_results():
    """Session 19, spec.training.acceleration.memory: max through the real trainer CLI: the fast path
    under the same policy reads 17,259 and 18,217 tokens/s (8B, 7B; auto's table reads 15,867 and
    16,751) and the CLI keeps at least 95% of it, every phase within 1.5x its floor. The second call
    reads back the CLI's published training_config.json: its plan took the max policy."""
    bench = _bench()
    first = _recorded("trainer_cli_speed_memory_max_session19_h200.json")
    assert first["options"]["memory"] == "max"
    table, ok = bench.render(first)
    assert ok and "MISSED" not in table
    for row, ratio in (("8b-1024", "0.973"), ("7b-1024", "1.013")):
        assert next(line for line in table.splitlines() if line.startswith(f"| {row} | ") and f"| {ratio} | met |" in line)
        assert "budget (max)" in first["rows"][row]["fast_path"]["plan"]
    second = _recorded("trainer_cli_speed_memory_max_session19b_h200.json")
    again, ok = bench.render(second)
    assert ok and _line(again, "7b-1024", "18608.0").endswith("| 1.019 | met |")
    resolved = second["rows"]["7b-1024"]["cli"]["resolved"]
    assert resolved["acceleration"] == {"path": "fused", "cudaGraphs": True, "memory": "max",
                                        "why": "spec.training.acceleration"}
    assert "budget (max)" in resolved["memoryPlan"] and "bf16 weight copies in 28 layers" in resolved["memoryPlan"]


def test_the_quantize_floor_on_a_downloaded_copy_is_shown_beside_the_original():
    """quantize_floor_downloaded (session 25): where the model came through the store, the floor
    taken on a downloaded copy and on the original, in fresh processes and after a download."""
    results = _results(cli_tps=48_000.0, download_s=14.0)
    results["rows"]["1.5b-2048"]["quantize_download"] = {
        "download_s": 9.0, "on_copy_after_download": 11.5, "on_original_after_download": 10.5,
        "on_copy_fresh_process": 11.0, "on_original_fresh_process": 10.2}
    table, _ = _bench().render(results)
    assert _line(table, "1.5b-2048", "12.0", "10.2") == "| 1.5b-2048 | 12.0 | 10.2 | 11.0 | 11.5, 10.5 |"
    del results["rows"]["1.5b-2048"]["quantize_download"]
    table, _ = _bench().render(results)
    assert "on a downloaded copy" not in table


def test_session_25s_cli_on_the_turn_weights_tree_renders_from_its_raw_results():
    """Session 25, the tree with the weights kept across the turn (c622bfc): the CLI at 0.967-1.024
    of the fast path on the three fixed-length rows in both calls. Phases missed: the 7B tokenize
    (0.07-0.08 s against 0.04-0.05, both calls), the 8B tokenize against the driver's warm pass
    (call a; met against the fresh process's pass in call b), the 1.5B quantize after a download
    (call b, 1.23 s against 0.71 s; 1.18x in call a from the pvc:// checkpoint); both met in call c."""
    bench = _bench()
    first, ok = bench.render(_recorded("trainer_cli_speed_session25a_h200.json"))
    assert not ok
    for row, ratio in (("8b-1024", "0.974"), ("7b-1024", "1.022"), ("1.5b-2048", "1.024"), ("varlen", "2.064")):
        assert next(line for line in first.splitlines() if line.startswith(f"| {row} | ") and f"| {ratio} | met |" in line)
    assert sorted(line.split(" | ")[0:2] for line in first.splitlines() if "MISSED" in line) == [
        ["| 7b-1024", "tokenize"], ["| 8b-1024", "tokenize"]]
    second, ok = bench.render(_recorded("trainer_cli_speed_session25b_h200.json"))
    for row, ratio in (("8b-1024", "0.967"), ("7b-1024", "1.017"), ("1.5b-2048", "1.021")):
        assert next(line for line in second.splitlines() if line.startswith(f"| {row} | ") and f"| {ratio} | met |" in line)
    assert "| 1.23 | 0.71 | 1.72x | MISSED |" in _line(second, "1.5b-2048", "quantize")
    assert sorted(line.split(" | ")[0:2] for line in second.splitlines() if "MISSED" in line) == [
        ["| 1.5b-2048", "quantize"], ["| 7b-1024", "tokenize"]]
    # Call c, the two rows that missed a phase again, every phase met; the downloaded copy's floor
    # beside the original's: a fresh copy is slower to place than the checkpoint it came from.
    third, ok = bench.render(_recorded("trainer_cli_speed_session25c_h200.json"))
    assert ok and "MISSED" not in third, third
    assert "| 1.07 | 0.91 | 1.17x | met |" in _line(third, "1.5b-2048", "quantize")
    assert _line(third, "1.5b-2048", "1.07", "0.63") == "| 1.5b-2048 | 1.07 | 0.63 | 0.88 | 1.01, 0.88 |"
