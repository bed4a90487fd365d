"""The benchmark scripts (benchmarks/*.py) as modules, for the tests that check their tables and
rules. Their module level imports the standard library only: no torch needed to load them."""

import importlib.util
from pathlib import Path

BENCHMARKS = Path(__file__).parents[2] / "benchmarks"


def load_benchmark(name: str):
    """benchmarks/<name>.py, loaded afresh (a test may patch its module-level settings)."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
