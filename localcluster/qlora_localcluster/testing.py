"""One local cluster per test session, for tests/conftest.py and the cluster tests.

    # tests/conftest.py
    @pytest.fixture(scope="session")
    def local_cluster():
        with qlora_localcluster.testing.running_cluster() as cluster:
            yield cluster

The cluster is left running afterwards when it was already running before (a developer's
`qlora-localcluster up`), and stopped when this session started it, unless QLORA_KEEP_CLUSTER=1.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

from .cluster import LocalCluster


@contextlib.contextmanager
def running_cluster(state_dir: Path | str | None = None) -> Iterator[LocalCluster]:
    cluster = LocalCluster(state_dir)
    was_running = cluster.is_ready()
    cluster.up()
    try:
        yield cluster
    finally:
        if not was_running and os.environ.get("QLORA_KEEP_CLUSTER") != "1":
            cluster.down()


def kubectl(cluster: LocalCluster, *args: str, check: bool = True,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
    """kubectl against `cluster`, failing the test (unless check=False) when it fails."""
    result = cluster.kubectl(*args, input=input, timeout=60)
    if check and result.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)} failed ({result.returncode}): {result.stderr}")
    return result
