"""Faults for the promise tests, injected for real on a private local cluster, and what the tests
read back: the trainer's own processes as the node agent started them, and operators that are
restarted when they exit, as a Deployment's pod would be.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from qlora_localcluster.cluster import LocalCluster

from support.operator_process import OperatorProcess
from support.tcp_proxy import CuttableProxy


class ApiServerStopped:
    """kube-apiserver stopped for everyone, then started again. SIGTERM first, as for a restart or
    an upgrade; its graceful shutdown waits for open watches (the node agent's, the controllers',
    the operator's) for up to a minute, so after `drain_s` it is SIGKILLed."""

    what = "the API server stopped"

    def __init__(self, cluster: LocalCluster, drain_s: float = 5.0):
        self.cluster, self.drain_s = cluster, drain_s

    def begin(self) -> str:
        return self.cluster.stop_component("kube-apiserver", timeout=self.drain_s)

    def end(self) -> float:
        """Starts it; returns the monotonic time its /readyz first answered."""
        started = time.monotonic()
        timings = self.cluster.up()
        return started + timings["api_ready_s"]


class OperatorCutOff:
    """The API server unreachable for the operator alone (its kubeconfig points at the proxy);
    nodes, controllers and kubectl go on as usual."""

    what = "the operator cut off from the API server"

    def __init__(self, proxy: CuttableProxy):
        self.proxy = proxy

    def begin(self) -> str:
        self.proxy.cut()
        return "cut"

    def end(self) -> float:
        self.proxy.restore()
        return time.monotonic()


class Supervised:
    """An operator process restarted whenever it exits (after `restart_delay` s), as the kubelet
    restarts a Deployment's container (restartPolicy Always; its first restart has no back-off).
    `exits` lists the exit codes seen."""

    def __init__(self, operator: OperatorProcess, restart_delay: float = 1.0):
        self.operator, self.restart_delay = operator, restart_delay
        self.exits: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="supervisor", daemon=True)

    def start(self) -> Supervised:
        self.operator.start()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.operator.stop()

    def _watch(self) -> None:
        while not self._stop.wait(0.2):
            code = self.operator.proc.poll()
            if code is not None:
                self.exits.append(code)
                if self._stop.wait(self.restart_delay):
                    return
                self.operator.start(wait=False)


def pod_processes(cluster: LocalCluster, pod_uid: str | None = None) -> list[int]:
    """Pids of the processes the cluster's node agents started for pods (for one pod, by uid): the
    agent gives each container NODEAGENT_POD_DIR=<node root>/pods/<uid>. What `ps` would show, read
    from /proc, so it does not depend on the API server or the agent reporting anything."""
    nodes = str((cluster.state_dir / "nodes").resolve())
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state == "Z":  # exited, not yet reaped by the agent: no longer running
            continue
        for entry in environ:
            if entry.startswith(b"NODEAGENT_POD_DIR="):
                pod_dir = entry.split(b"=", 1)[1].decode(errors="replace")
                if pod_dir.startswith(nodes + "/") and (pod_uid is None or Path(pod_dir).name == pod_uid):
                    found.append(int(proc.name))
    return found
