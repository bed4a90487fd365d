"""plan_actions(job, observed, status) -> the creates and patches that bring the children to what
the spec and the derived status call for. Pure; `kube.apply` carries them out.

An empty plan is the steady state: running it again right after applying it changes nothing.
"""

from dataclasses import dataclass, field

from qlora_api import QLoRAJobStatus

from qlora_operator import kueue_facts as kf
from qlora_operator import pod_facts as pf
from qlora_operator import timestamps
from qlora_operator.attempts import job_deadline_seconds, judge
from qlora_operator.conditions import is_terminal
from qlora_operator.observation import Observed
from qlora_operator.rendering import render_config_map, render_rendezvous_service, render_trainer_job
from qlora_operator.resource import QLoRAJob
from qlora_operator.settings import DEFAULTS, OperatorSettings


@dataclass(frozen=True)
class Create:
    obj: dict
    why: str

    @property
    def kind(self) -> str:
        return self.obj["kind"]

    @property
    def name(self) -> str:
        return self.obj["metadata"]["name"]


@dataclass(frozen=True)
class Patch:
    kind: str  # Job, ConfigMap or (Kueue's) Workload
    name: str
    patch: dict  # a JSON merge patch
    why: str = field(compare=False)


Action = Create | Patch


def plan_actions(job: QLoRAJob, observed: Observed, status: QLoRAJobStatus,
                 settings: OperatorSettings = DEFAULTS) -> list[Action]:
    """`status` is the one derive_status just returned for the same observation."""
    if job.spec is None:
        return []
    if is_terminal(status):
        return _finished_job_ttls(job, observed)
    verdict = judge(job, observed, settings, status.start_time)
    if verdict.next_attempt_at is not None:
        if verdict.next_attempt_at > observed.now:
            return []
        return _new_attempt(job, observed, verdict.attempt + 1, status, settings)
    current = observed.jobs.get(verdict.attempt)
    if current is None or pf.job_finished(current):
        return []
    actions: list[Action] = []
    if verdict.attempt not in observed.config_maps:  # deleted by hand: the pod cannot start without it
        actions.append(Create(render_config_map(job, verdict.attempt), "the attempt's config is missing"))
    actions += _mutable_fields(job, current, status, observed.workloads.get(verdict.attempt))
    return actions


def _new_attempt(job: QLoRAJob, observed: Observed, attempt: int, status: QLoRAJobStatus,
                 settings: OperatorSettings) -> list[Action]:
    if trainers_still_running(observed):
        return []  # never two trainers at once: the next attempt waits until they have terminated
    start = status.start_time or observed.now
    actions: list[Action] = []
    if attempt not in observed.config_maps:
        actions.append(Create(render_config_map(job, attempt), f"config of attempt {attempt}"))
    service = render_rendezvous_service(job, attempt)
    if service is not None:  # before the Job: its pods resolve each other through it
        actions.append(Create(service, f"rendezvous of attempt {attempt}"))
    deadline = job_deadline_seconds(job, start, observed.now)
    actions.append(Create(render_trainer_job(job, attempt, default_image=settings.trainer_image,
                                             active_deadline_seconds=deadline), f"attempt {attempt}"))
    return actions


def trainers_still_running(observed: Observed) -> list[str]:
    """Pods of earlier attempts that have not terminated: the pod of a Job deleted by hand (the
    garbage collector removes it later), an orphaned one, or one its Job gave up on while it stops."""
    live = [p["metadata"]["name"] for pods in observed.pods.values() for p in pods if not pf.pod_terminated(p)]
    return sorted(live) + list(observed.stray_pods)


def _mutable_fields(job: QLoRAJob, current: dict, status: QLoRAJobStatus, workload: dict | None) -> list[Action]:
    """suspend and activeDeadlineSeconds follow the QLoRAJob's spec while the Job runs.

    A Job queued by Kueue is Kueue's to suspend and unsuspend (it would undo any change to
    spec.suspend of an admitted Job); the user's spec.suspend goes to the Workload's spec.active
    instead, which is how Kueue deactivates (evicts and holds) and requeues a workload."""
    spec = current.get("spec") or {}
    name = current["metadata"]["name"]
    actions: list[Action] = []
    patch: dict = {}
    if kf.queue_name(current):
        if workload is not None and kf.is_active(workload) == job.spec.suspend:
            actions.append(Patch("Workload", workload["metadata"]["name"], {"spec": {"active": not job.spec.suspend}},
                                 "spec.suspend (Kueue deactivates or requeues the workload)"))
    elif bool(spec.get("suspend")) != job.spec.suspend:
        patch["suspend"] = job.spec.suspend
    created = timestamps.parse(current["metadata"].get("creationTimestamp"))
    want = job_deadline_seconds(job, status.start_time, created)
    if not job.spec.suspend and spec.get("activeDeadlineSeconds") != want:
        patch["activeDeadlineSeconds"] = want
    if patch:
        actions.append(Patch("Job", name, {"spec": patch}, f"spec changed: {', '.join(sorted(patch))}"))
    return actions


def _finished_job_ttls(job: QLoRAJob, observed: Observed) -> list[Action]:
    """ttlSecondsAfterFinished goes onto finished Jobs only once the outcome is in the QLoRAJob's
    status, so the TTL controller can never delete a result before the operator has read it."""
    ttl = job.spec.ttl_seconds_after_finished
    actions: list[Action] = []
    for _attempt, trainer_job in sorted(observed.jobs.items()):
        if not pf.job_finished(trainer_job):
            continue
        if (trainer_job.get("spec") or {}).get("ttlSecondsAfterFinished") != ttl:
            actions.append(Patch("Job", trainer_job["metadata"]["name"],
                                 {"spec": {"ttlSecondsAfterFinished": ttl}}, "spec.ttlSecondsAfterFinished"))
    return actions
