"""The periodic resync that makes the operator level-triggered.

Every interval it takes one snapshot (a LIST of the QLoRAJobs it serves and one of each kind of
child, Reconciler.is_settled) and reconciles, from fresh reads, each job the snapshot shows would
change, so a missed event or an operator restart costs at most one interval. Events (kopf's
handlers on QLoRAJobs, their Jobs and pods) drive the work; the resync is the safety net, and its
cost is a few LISTs per interval plus one log read per running trainer, not requests per job: at a
thousand jobs, reconciling each from fresh reads every interval (a GET and three LISTs apiece)
would take more than the interval and load the API server with hundreds of requests a second.
A finished job found settled is not derived again while neither it nor its Jobs change (the same
resourceVersions): a finished job's status depends on nothing else, not even the clock, and
deriving a thousand of them every interval cost an idle operator 17 s of CPU a minute. It is a plain thread rather than a
kopf timer on purpose: kopf puts a finalizer on every object that has a timer, so a QLoRAJob could
not be deleted while no operator runs (and, rarely, kopf left that finalizer in place after the
deletion). With no timer and no deletion handler that needs one, QLoRAJobs carry no finalizer and
deleting one is immediate; its Jobs and ConfigMaps go through the garbage collector.
"""

import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from qlora_api import ConditionType

from qlora_operator.kube import Kube
from qlora_operator.observation import Snapshot
from qlora_operator.reconcile import Reconciler

log = logging.getLogger("qlora_operator.resync")
CHECKERS = 8
FINISHED = {ConditionType.SUCCEEDED, ConditionType.FAILED}


def finished_fingerprint(body: dict, snapshot: Snapshot) -> tuple | None:
    """What a finished job's settledness depends on (its own resourceVersion and its Jobs'), read
    from the raw objects without parsing them; None for a job that has not finished, whose status
    also depends on its pods, its trainer's log and the clock."""
    conditions = (body.get("status") or {}).get("conditions") or []
    if not any(c.get("type") in FINISHED and c.get("status") == "True" for c in conditions):
        return None
    meta = body["metadata"]
    jobs = snapshot.children_of(meta["namespace"], meta["name"])["Job"]
    return (meta.get("resourceVersion"),
            tuple(sorted((j["metadata"].get("uid"), j["metadata"].get("resourceVersion")) for j in jobs)))



class Resync:
    def __init__(self, kube: Kube, reconciler: Reconciler, namespaces: tuple[str, ...], interval: float,
                 enqueue: Callable[[str, str], None] | None = None):
        """`enqueue` hands an unsettled job to the work queue; without one it is reconciled here."""
        self.kube, self.reconciler = kube, reconciler
        self.enqueue = enqueue or reconciler.reconcile
        self.namespaces, self.interval = namespaces, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="qlora-resync", daemon=True)
        self._settled_finished: dict[str, tuple] = {}  # job key -> finished_fingerprint when last found settled
        # A few checks at once: each running trainer's costs a log read, and one after the other
        # they made a sweep of a busy API server outlast its interval.
        self._pool = ThreadPoolExecutor(CHECKERS, thread_name_prefix="qlora-resync-check")

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def run_once(self) -> tuple[int, int]:
        """Check every served QLoRAJob once; returns (how many there were, how many were unsettled)."""
        snapshot = self.kube.snapshot(self.namespaces)
        jobs = [(b["metadata"]["namespace"], b["metadata"]["name"], b) for b in snapshot.qlorajobs]
        keys = {f"{ns}/{name}" for ns, name, _ in jobs}
        self.reconciler.phases.retain(keys)
        for gone in set(self._settled_finished) - keys:
            self._settled_finished.pop(gone, None)

        def check(job: tuple[str, str, dict]) -> bool:
            namespace, name, body = job
            if self._stop.is_set():
                return False
            key, fingerprint = f"{namespace}/{name}", finished_fingerprint(body, snapshot)
            if fingerprint is not None and self._settled_finished.get(key) == fingerprint:
                return False
            try:
                if self.reconciler.is_settled(body, snapshot):
                    if fingerprint is not None:
                        self._settled_finished[key] = fingerprint
                    return False
                self.enqueue(namespace, name)
                return True
            except Exception:  # counted by the reconciler; the next job and the next tick go on
                log.exception("reconcile of %s/%s failed", namespace, name)
                return False

        unsettled = sum(self._pool.map(check, jobs))
        return len(jobs), unsettled

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
            except Exception:
                log.exception("listing QLoRAJobs failed; retrying in %.0f s", self.interval)
            self._stop.wait(self.interval)
