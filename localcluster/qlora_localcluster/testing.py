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
import random
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


# Ports for private clusters and test processes come from below the kernel's ephemeral range. A port
# picked by binding to 0 is an ephemeral one, and until the component meant to listen on it starts
# (a node agent starts seconds after its cluster's ports are picked) any process's outgoing
# connection can take it as its local end: a second node agent died with EADDRINUSE twice under
# parallel test workers, on a port found free moments before. Below the range only explicit binds
# compete, and a reservation file per port (holding the reserving process's pid, reclaimed once that
# process is gone) keeps concurrent test processes from picking the same one.
_RESERVED_FROM = 21000  # above the shared cluster's fixed ports (cluster.ClusterSettings)
_RESERVATIONS = Path(os.environ.get("TMPDIR", "/tmp")) / "qlora-localcluster-ports"


def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _reserve(port: int) -> bool:
    """Whether this process now holds `port`'s reservation (taken over from a process that is gone)."""
    path = _RESERVATIONS / str(port)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = int(path.read_text() or "0")
                if holder == os.getpid():
                    return False  # ours already, for another caller of this process
                os.kill(holder, 0)
                return False
            except (ProcessLookupError, ValueError, FileNotFoundError):
                path.unlink(missing_ok=True)  # its process is gone: take it over
                continue
            except PermissionError:
                return False  # another user's live process
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return True
    return False


def release_ports(ports) -> None:
    """Give back reservations this process made (free_ports, free_port_block)."""
    for port in ports:
        path = _RESERVATIONS / str(port)
        with contextlib.suppress(OSError, ValueError):
            if int(path.read_text() or "0") == os.getpid():
                path.unlink()


def free_port_block(n: int, tries: int = 200) -> int:
    """The first of n consecutive loopback ports, reserved for this process and free right now (node
    agent i of a private cluster listens on base + i)."""
    _RESERVATIONS.mkdir(parents=True, exist_ok=True)
    top = _ephemeral_start() - n
    for _ in range(tries):
        base = random.randrange(_RESERVED_FROM, top)
        taken = []
        for port in range(base, base + n):
            if not _reserve(port):
                break
            taken.append(port)
        if len(taken) == n and all(_bindable(port) for port in taken):
            return base
        release_ports(taken)
    raise RuntimeError(f"no {n} consecutive free loopback ports in {_RESERVED_FROM}-{top} after {tries} tries")


def free_ports(n: int) -> list[int]:
    """n distinct loopback ports, reserved for this process and free right now."""
    return [free_port_block(1) for _ in range(n)]


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


@contextlib.contextmanager
def private_cluster(state_dir: Path | str, timeout: float = 240.0, **settings) -> Iterator[LocalCluster]:
    """A cluster of this test's own (for faults that would break the shared one: stopping the API
    server, MinIO or a node), on free ports so it never meets the shared cluster; always stopped after.
    Node agents use base port + i, a block of gpu_nodes ports reserved together (free_port_block)."""
    ports = dict(zip(PORT_SETTINGS, free_ports(len(PORT_SETTINGS)), strict=True))
    nodes = settings.get("gpu_nodes", 1)
    ports["node_agent_base_port"] = free_port_block(nodes)
    cluster = LocalCluster(state_dir, **{**ports, **settings})
    try:
        cluster.up(timeout=timeout)
        yield cluster
    finally:
        cluster.down()
        base = ports["node_agent_base_port"]
        release_ports([*ports.values(), *range(base + 1, base + nodes)])


def kubectl(cluster: LocalCluster, *args: str, check: bool = True,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
    """kubectl against `cluster`, failing the test (unless check=False) when it fails."""
    result = cluster.kubectl(*args, input=input, timeout=60)
    if check and result.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)} failed ({result.returncode}): {result.stderr}")
    return result
