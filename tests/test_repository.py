"""The repository's own hygiene, checked in CI like any other behaviour."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_ruff_finds_nothing():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "operator", "trainer_image", "localcluster",
                             "tests", "benchmarks"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_import_package_shadows_the_standard_library():
    packages = {p.parent.name for p in REPO.glob("*/*/__init__.py")}
    assert packages and not packages & set(sys.stdlib_module_names), packages
