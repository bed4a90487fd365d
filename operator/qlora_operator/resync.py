"""The periodic resync that makes the operator level-triggered.

Every interval it lists the QLoRAJobs it serves and reconciles each from its actual children, so a
missed event or an operator restart costs at most one interval. It is a plain thread rather than a
kopf timer on purpose: kopf puts a finalizer on every object that has a timer, so a QLoRAJob could
not be deleted while no operator runs (and, rarely, kopf left that finalizer in place after the
deletion). With no timer and no deletion handler that needs one, QLoRAJobs carry no finalizer and
deleting one is immediate; its Jobs and ConfigMaps go through the garbage collector.
"""

import logging
import threading

from qlora_operator.kube import Kube
from qlora_operator.reconcile import Reconciler

log = logging.getLogger("qlora_operator.resync")


class Resync:
    def __init__(self, kube: Kube, reconciler: Reconciler, namespaces: tuple[str, ...], interval: float):
        self.kube, self.reconciler = kube, reconciler
        self.namespaces, self.interval = namespaces, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="qlora-resync", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def run_once(self) -> int:
        """Reconcile every served QLoRAJob once; returns how many there were."""
        jobs = self.kube.list_qlorajobs(self.namespaces)
        self.reconciler.phases.retain({f"{ns}/{name}" for ns, name in jobs})
        for namespace, name in jobs:
            if self._stop.is_set():
                break
            try:
                self.reconciler.reconcile(namespace, name)
            except Exception:  # counted by the reconciler; the next job and the next tick go on
                log.exception("reconcile of %s/%s failed", namespace, name)
        return len(jobs)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
            except Exception:
                log.exception("listing QLoRAJobs failed; retrying in %.0f s", self.interval)
            self._stop.wait(self.interval)
