"""One reconcile of one QLoRAJob: read it fresh, observe its children, derive its status, plan the
children's changes, apply. Whatever woke it (a create, an update, a child's event, the timer, a
restart) it does the same thing, so it can run any number of times.
"""

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from qlora_api import ConditionType, QLoRAJobStatus, Reason

from qlora_operator import metrics, timestamps
from qlora_operator.conditions import find, is_terminal
from qlora_operator.derivation import OperatorEvent, derive_status
from qlora_operator.kube import Conflict, Kube
from qlora_operator.kueue_facts import queue_name
from qlora_operator.naming import ANNOTATION_JOB_NAME
from qlora_operator.observation import Observed, Snapshot, group_children
from qlora_operator.planning import Create, plan_actions
from qlora_operator.rejection import Rejected, rejected_status
from qlora_operator.resource import QLoRAJob
from qlora_operator.settings import OperatorSettings

log = logging.getLogger(__name__)
BEFORE_FIRST_RUN = {None, Reason.PENDING, Reason.QUEUED, Reason.UNSCHEDULABLE, Reason.IMAGE_PULL_FAILED,
                    Reason.CONTAINER_CONFIG_ERROR}


@dataclass
class _Gate:
    """At most one reconcile per job at a time; a request that arrives meanwhile makes the running
    one go round again instead of waiting (child events come in bursts)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    pending: bool = False


class Reconciler:
    def __init__(self, kube: Kube, settings: OperatorSettings, phases: metrics.PhaseBook | None = None,
                 clock: Callable[[], datetime] = timestamps.now,
                 post_event: Callable[[QLoRAJob, OperatorEvent, datetime], None] | None = None):
        """`post_event`: how Events go out (the operator: event_poster.EventPoster, in the background);
        by default each is posted before the reconcile returns."""
        self.kube = kube
        self.post_event = post_event or kube.post_event
        self.settings = settings
        self.phases = phases or metrics.PhaseBook()
        self.clock = clock
        self._gates: dict[str, _Gate] = {}
        self._gates_lock = threading.Lock()

    def reconcile(self, namespace: str, name: str) -> None:
        key = f"{namespace}/{name}"
        with self._gates_lock:
            gate = self._gates.setdefault(key, _Gate())
        gate.pending = True
        while gate.pending:
            if not gate.lock.acquire(blocking=False):
                return  # the reconcile running now will see pending and go again
            try:
                while gate.pending:
                    gate.pending = False
                    self._reconcile_fresh(namespace, name)
            except Exception:
                metrics.RECONCILE_ERRORS.labels(kind="QLoRAJob").inc()
                raise
            finally:
                gate.lock.release()

    @staticmethod
    def owner_of(child: dict) -> tuple[str, str] | None:
        """(namespace, name) of the QLoRAJob a Job or pod of ours belongs to: a change of the child is
        a reason to reconcile it now, not at the next tick."""
        meta = child.get("metadata", {})
        name = (meta.get("annotations") or {}).get(ANNOTATION_JOB_NAME)
        return (meta["namespace"], name) if name and meta.get("namespace") else None

    def forget(self, namespace: str, name: str) -> None:
        self.phases.forget(f"{namespace}/{name}")
        with self._gates_lock:
            self._gates.pop(f"{namespace}/{name}", None)

    def is_settled(self, body: dict, snapshot: Snapshot) -> bool:
        """The resync's check of one job against a snapshot (no request but, for a trainer that runs,
        one log read): True when a reconcile would write nothing, neither status nor children. Only
        then is the job left alone; anything else goes through a fresh reconcile, so every write is
        still decided on fresh reads. This is what keeps the safety net's cost flat in the number of
        settled (finished, queued, waiting) jobs."""
        if body["metadata"].get("deletionTimestamp"):
            return True
        job = QLoRAJob.from_body(body)
        children = snapshot.children_of(job.namespace, job.name)
        if any(queue_name(j) for j in children["Job"]):
            return False  # Kueue's Workloads are read per job, by the fresh reconcile
        now = self.clock()
        finished = is_terminal(job.status)  # as the fresh reconcile: a finished job needs its Jobs only
        observed = group_children(job.uid, now, [] if finished else children["ConfigMap"], children["Job"],
                                  [] if finished else children["Pod"])
        if not finished:
            observed = self.kube.with_progress(job.namespace, observed, self.settings.log_tail_lines)
        status, _ = derive_status(job, observed, self.settings)
        if status != job.status or plan_actions(job, observed, status, self.settings):
            return False
        self.phases.record(job.key, status.phase)
        return True

    def _reconcile_fresh(self, namespace: str, name: str) -> None:
        for _ in range(3):
            try:
                return self.reconcile_once(namespace, name)
            except Conflict as conflict:
                log.debug("%s; reconciling again", conflict)
        log.info("%s/%s kept changing during reconciles; the next one will catch up", namespace, name)

    def reconcile_new(self, body: dict) -> bool:
        """The first reconcile of a QLoRAJob just created, from the body of its create event and no
        reads: True if done, False if it must go the usual way (queued, fresh reads).

        A body whose status has no condition was never reconciled, and every reconcile writes the
        status (which always gains a condition) before it creates any child, so such a job has no
        children of ours: the three LISTs of a fresh reconcile would come back empty. The status
        write is guarded by the body's resourceVersion, so a body that is no longer current (a
        reconcile got there first) raises Conflict and the job goes the usual way. Skipping the GET
        and the LISTs is what keeps creation-to-Job latency short when many jobs arrive at once:
        the API server's time goes to the three writes that matter (status, ConfigMap, Job)."""
        meta = body.get("metadata") or {}
        if (body.get("status") or {}).get("conditions") or meta.get("deletionTimestamp"):
            return False
        with self._gates_lock:
            gate = self._gates.setdefault(f"{meta['namespace']}/{meta['name']}", _Gate())
        if not gate.lock.acquire(blocking=False):
            return False
        try:
            now = self.clock()
            self._act(QLoRAJob.from_body(body), Observed(now=now), now)
            return True
        except Conflict as conflict:
            log.debug("%s; queued for a fresh reconcile", conflict)
            return False
        finally:
            gate.lock.release()

    def reconcile_once(self, namespace: str, name: str) -> None:
        body = self.kube.get_qlorajob(namespace, name)
        if body is None or body["metadata"].get("deletionTimestamp"):
            return  # the garbage collector removes the children through their owner references
        job = QLoRAJob.from_body(body)
        now = self.clock()
        observed = self.kube.observe(job, now, self.settings.log_tail_lines,
                                     with_pods=not is_terminal(job.status))
        self._act(job, observed, now)

    def _act(self, job: QLoRAJob, observed: Observed, now: datetime) -> None:
        """Derive the status from what was observed, write it, then apply the planned changes."""
        status, events = derive_status(job, observed, self.settings)
        if status != job.status:
            self.kube.patch_status(job, status)  # a Conflict here: nothing was written, no Events either
            log.info("%s: %s", job.key, status.message or status.phase)
        if _first_run(job.status, status):
            metrics.observe_time_to_running(job.created, now)
        try:
            for action in plan_actions(job, observed, status, self.settings):
                try:
                    changed = self.kube.apply(job.namespace, action)
                except Rejected as rejection:
                    self._fail_rejected(job, status, rejection, now)
                    return
                log.info("%s: %s %s %s (%s)", job.key, type(action).__name__.lower(), action.kind, action.name,
                         action.why if changed else "already done")
                if changed and isinstance(action, Create) and action.kind == "Job":
                    self._record(job, OperatorEvent("Normal", Reason.JOB_CREATED,
                                                    f"created trainer Job {action.name} ({action.why})"), now)
        finally:
            # The status's Events after the children: Events are best effort and, on a busy API
            # server, each is a round trip that would otherwise delay the trainer Job.
            for event in events:
                self._record(job, event, now)
        self.phases.record(job.key, status.phase)

    def _fail_rejected(self, job: QLoRAJob, status: QLoRAJobStatus, rejection: Rejected, now: datetime) -> None:
        """Written over the status just derived: its resourceVersion guard is the one that read it
        (the status written a moment ago changed it), so the job is read again."""
        body = self.kube.get_qlorajob(job.namespace, job.name)
        if body is None:
            return
        fresh = QLoRAJob.from_body(body)
        failed = rejected_status(fresh, fresh.status, rejection, now)
        self.kube.patch_status(fresh, failed)
        log.warning("%s: %s", job.key, failed.message)
        self._record(job, OperatorEvent("Warning", Reason.JOB_REJECTED, failed.message[:1024]), now)
        self.phases.record(job.key, failed.phase)

    def _record(self, job: QLoRAJob, event: OperatorEvent, now: datetime) -> None:
        self.post_event(job, event, now)
        metrics.TRANSITIONS.labels(reason=event.reason).inc()


def _first_run(old: QLoRAJobStatus, new: QLoRAJobStatus) -> bool:
    before, after = find(old, ConditionType.RUNNING), find(new, ConditionType.RUNNING)
    started = after is not None and after.status == "True"
    was_waiting = before is None or (before.status != "True" and before.reason in BEFORE_FIRST_RUN)
    return started and was_waiting and (new.attempts or 0) <= 1
