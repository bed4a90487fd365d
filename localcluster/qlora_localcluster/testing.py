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
import socket
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


PORT_SETTINGS = ("etcd_client_port", "etcd_peer_port", "apiserver_port", "controller_manager_port",
                 "scheduler_port", "s3_port", "s3_console_port", "node_agent_base_port")


def free_ports(n: int) -> list[int]:
    """n distinct loopback ports free right now (held open together, so no two are the same)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@contextlib.contextmanager
def private_cluster(state_dir: Path | str, timeout: float = 240.0, **settings) -> Iterator[LocalCluster]:
    """A cluster of this test's own (for faults that would break the shared one: stopping the API
    server, MinIO or a node), on free ports so it never meets the shared cluster; always stopped after.
    Node agents use base port + i, so ask for gpu_nodes <= 8 (the ports above the base are not checked)."""
    ports = dict(zip(PORT_SETTINGS, free_ports(len(PORT_SETTINGS)), strict=True))
    cluster = LocalCluster(state_dir, **{**ports, **settings})
    try:
        cluster.up(timeout=timeout)
        yield cluster
    finally:
        cluster.down()


def kubectl(cluster: LocalCluster, *args: str, check: bool = True,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
    """kubectl against `cluster`, failing the test (unless check=False) when it fails."""
    result = cluster.kubectl(*args, input=input, timeout=60)
    if check and result.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)} failed ({result.returncode}): {result.stderr}")
    return result
