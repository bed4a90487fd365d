"""The observed world of one QLoRAJob: its trainer Jobs, their pods, ConfigMaps and (for Jobs queued
by Kueue) Workloads, grouped by attempt, and the trainer's latest progress line. Built by `kube.observe`; pure data from here on."""

from dataclasses import dataclass, field
from datetime import datetime

from qlora_api import TrainerProgressLine, TrainingProgress
from qlora_api.meta import LABEL_JOB_NAME

from qlora_operator import pod_facts as pf
from qlora_operator.naming import attempt_of, label_value
from qlora_operator.resource import owned_by


@dataclass(frozen=True)
class Observed:
    now: datetime
    jobs: dict[int, dict] = field(default_factory=dict)  # attempt -> batch/v1 Job
    pods: dict[int, list[dict]] = field(default_factory=dict)  # attempt -> that Job's pods
    config_maps: dict[int, dict] = field(default_factory=dict)  # attempt -> ConfigMap
    progress: TrainingProgress | None = None  # the newest progress line in the trainer's log
    # Trainer pods of this QLoRAJob's name whose Job is gone (deleted, orphaned) and which have not
    # terminated: a trainer may still be running there, so no new attempt may start yet.
    stray_pods: tuple[str, ...] = ()
    workloads: dict[int, dict] = field(default_factory=dict)  # attempt -> Kueue Workload of that Job

    @property
    def latest_attempt(self) -> int:
        return max(self.jobs, default=0)


def group_children(owner_uid: str, now: datetime, config_maps: list[dict], jobs: list[dict],
                   pods: list[dict], workloads: list[dict] = ()) -> Observed:
    """Keeps only what this QLoRAJob (by uid) controls: a QLoRAJob deleted and created again under the
    same name must not adopt the children the garbage collector has yet to remove."""
    own_jobs = {attempt_of(j): j for j in jobs if owned_by(j, owner_uid) and attempt_of(j)}
    attempt_by_job_uid = {j["metadata"]["uid"]: a for a, j in own_jobs.items()}
    own_pods: dict[int, list[dict]] = {}
    for pod in pods:
        for ref in pod["metadata"].get("ownerReferences") or []:
            attempt = attempt_by_job_uid.get(ref.get("uid"))
            if attempt is not None:
                own_pods.setdefault(attempt, []).append(pod)
    own_workloads = {}
    for workload in workloads:  # Kueue makes the Job the Workload's controller
        for ref in workload["metadata"].get("ownerReferences") or []:
            attempt = attempt_by_job_uid.get(ref.get("uid"))
            if attempt is not None and ref.get("controller"):
                own_workloads[attempt] = workload
    own_maps = {attempt_of(c): c for c in config_maps if owned_by(c, owner_uid) and attempt_of(c)}
    owned = {id(p) for group in own_pods.values() for p in group}
    strays = tuple(sorted(p["metadata"]["name"] for p in pods
                          if id(p) not in owned and attempt_of(p) and not pf.pod_terminated(p)))
    return Observed(now=now, jobs=own_jobs, pods=own_pods, config_maps=own_maps, workloads=own_workloads,
                    stray_pods=strays)


def pod_to_tail(observed: Observed) -> dict | None:
    """The latest attempt's newest pod whose trainer has started (running or just exited); in a
    data-parallel group, index 0's (rank 0 alone prints progress)."""
    pods = pf.by_age(observed.pods.get(observed.latest_attempt, []))
    if any(pf.completion_index(p) is not None for p in pods):
        pods = [p for p in pods if pf.completion_index(p) == 0]
    for pod in reversed(pods):
        if pf.trainer_running(pod) or pf.trainer_terminated(pod):
            return pod
    return None


def latest_progress(log_text: str) -> TrainingProgress | None:
    """The last progress report in a log tail, as the status stores it."""
    for line in reversed(log_text.splitlines()):
        report = TrainerProgressLine.parse(line)
        if report is not None:
            return TrainingProgress.model_validate(report.model_dump(exclude={"event"}))
    return None


@dataclass(frozen=True)
class Snapshot:
    """Every served QLoRAJob and every child of ours, each kind from one LIST (per namespace, or
    cluster-wide), for the resync: a check of a thousand jobs costs the same few requests as one.
    Children are indexed by namespace and the QLoRAJob-name label, i.e. exactly the set the per-job
    label selector (naming.children_selector) returns; group_children then checks owner uids."""

    qlorajobs: list[dict]
    config_maps: list[dict] = field(default_factory=list)
    jobs: list[dict] = field(default_factory=list)
    pods: list[dict] = field(default_factory=list)
    _index: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self):
        for kind, items in (("ConfigMap", self.config_maps), ("Job", self.jobs), ("Pod", self.pods)):
            for item in items:
                meta = item["metadata"]
                owner = (meta.get("labels") or {}).get(LABEL_JOB_NAME)
                if owner:
                    self._index.setdefault((meta.get("namespace"), owner), {}).setdefault(kind, []).append(item)

    def children_of(self, namespace: str, name: str) -> dict[str, list[dict]]:
        """{"ConfigMap": [...], "Job": [...], "Pod": [...]} labelled for this QLoRAJob."""
        found = self._index.get((namespace, label_value(name)), {})
        return {kind: found.get(kind, []) for kind in ("ConfigMap", "Job", "Pod")}
