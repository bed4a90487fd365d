"""One local cluster per test session, for tests/conftest.py and the cluster tests.

    with qlora_localcluster.testing.running_cluster() as cluster:   # one process
        ...

A test run of several processes (pytest-xdist workers) shares one cluster through
`session_cluster(run_id)` (each worker, when it first needs it) and `stop_session_cluster(run_id)`
(the controller, once every worker is done): tests/conftest.py.

The cluster is left running afterwards when it was already running before (a developer's
`qlora-localcluster up`), and stopped when this session started it, unless QLORA_KEEP_CLUSTER=1.
"""

from __future__ import annotations

import contextlib
import fcntl
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


# Which test run started the cluster in this state directory: that run, and only it, stops it.
_STARTED_BY = "started-by-test-run"


@contextlib.contextmanager
def _state_dir_lock(cluster: LocalCluster) -> Iterator[None]:
    """Held while a process checks and starts the cluster: up() rewrites kubeconfigs and starts
    processes on fixed ports, so two workers must never do it at once (flock: freed if one dies)."""
    cluster.state_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(cluster.state_dir / "session.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def session_cluster(run_id: str, state_dir: Path | str | None = None) -> LocalCluster:
    """The cluster of test run `run_id`, started by whichever of its processes asks first. A cluster
    already running that this run did not start (a developer's) is used and left alone."""
    cluster = LocalCluster(state_dir)
    marker = cluster.state_dir / _STARTED_BY
    with _state_dir_lock(cluster):
        ours = marker.exists() and marker.read_text() == run_id
        if cluster.is_ready():
            return cluster
        if not ours:
            marker.write_text(run_id)  # before up(): a start that fails half-way is still stopped
        cluster.up()
    return cluster


def stop_session_cluster(run_id: str, state_dir: Path | str | None = None) -> None:
    """At the end of test run `run_id`: stop the cluster if this run started it (unless
    QLORA_KEEP_CLUSTER=1)."""
    cluster = LocalCluster(state_dir)
    marker = cluster.state_dir / _STARTED_BY
    if not (marker.exists() and marker.read_text() == run_id):
        return
    with _state_dir_lock(cluster):
        if os.environ.get("QLORA_KEEP_CLUSTER") != "1":
            cluster.down()
        marker.unlink()


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


def free_port_block(n: int, tries: int = 50) -> int:
    """The first of n consecutive loopback ports free right now (node agent i listens on base + i:
    under parallel test workers, base + 1 taken by another process stopped a second node's agent)."""
    for _ in range(tries):
        base = free_ports(1)[0]
        sockets = []
        try:
            for port in range(base, base + n):
                s = socket.socket()
                sockets.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise RuntimeError(f"no {n} consecutive free loopback ports after {tries} tries")


@contextlib.contextmanager
def private_cluster(state_dir: Path | str, timeout: float = 240.0, **settings) -> Iterator[LocalCluster]:
    """A cluster of this test's own (for faults that would break the shared one: stopping the API
    server, MinIO or a node), on free ports so it never meets the shared cluster; always stopped after.
    Node agents use base port + i, a block of gpu_nodes ports found free together."""
    ports = dict(zip(PORT_SETTINGS, free_ports(len(PORT_SETTINGS)), strict=True))
    ports["node_agent_base_port"] = free_port_block(settings.get("gpu_nodes", 1))
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
