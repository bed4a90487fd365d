"""What happened to an attempt (one trainer Job and its pods), and what comes next. Pure functions.

`assess_attempt` reads one Job and its pods into an AttemptState a human can act on;
`judge` adds the QLoRAJob's own rules on top (backoffLimit, activeDeadlineSeconds across all
attempts, the delay before a retry). `derive_status` and `plan_actions` both start from `judge`,
so the status a user reads and the Jobs the operator creates can never disagree.
"""

from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from enum import StrEnum

from qlora_api import ExitCode, Reason, TrainerError, TrainerResultMessage, TrainingResult
from qlora_api.protocol import parse_termination_message

from qlora_operator import kueue_facts as kf
from qlora_operator import pod_facts as pf
from qlora_operator import timestamps
from qlora_operator.naming import trainer_job_name
from qlora_operator.observation import Observed
from qlora_operator.resource import QLoRAJob
from qlora_operator.settings import OperatorSettings


class AttemptPhase(StrEnum):
    PENDING = "Pending"  # no trainer running yet (or any more): the reason says what it waits for
    RUNNING = "Running"
    DISRUPTED = "Disrupted"  # evicted or preempted; the Job is replacing the pod
    SUSPENDED = "Suspended"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


@dataclass(frozen=True)
class AttemptState:
    phase: AttemptPhase
    reason: str
    message: str
    retryable: bool = False
    result: TrainingResult | None = None
    finished_at: datetime | None = None
    scheduled: tuple[str, str, str] | None = None  # (status, reason, message) of the Scheduled condition
    pod: str | None = None


def _workers(job: dict) -> int:
    """Pods of the attempt: an Indexed Job's completions (a data-parallel group), else one."""
    spec = job.get("spec") or {}
    return int(spec.get("completions") or 1) if spec.get("completionMode") == "Indexed" else 1


def _exit_code_reason(code: int) -> str:
    return ExitCode(code).name.title().replace("_", "")  # STORAGE_UNAVAILABLE -> StorageUnavailable


def _retryable(code: int) -> bool:
    """Known trainer codes say it themselves; anything else (a signal, a segfault) is worth a retry."""
    return ExitCode(code).retryable if code in ExitCode._value2member_map_ else True


def classify_pod_failure(pod: dict) -> AttemptState:
    """Why a trainer pod failed, from its container's terminated state and termination message."""
    name = pod["metadata"]["name"]
    term = pf.trainer_terminated(pod)
    finished = timestamps.parse((term or {}).get("finishedAt"))
    if term is None:
        status = pod.get("status") or {}
        reason = Reason.EVICTED if status.get("reason") == "Evicted" else Reason.POD_LOST
        message = status.get("message") or f"trainer pod {name} failed before its container ran"
        return AttemptState(AttemptPhase.FAILED, reason, message, retryable=True, pod=name)
    if term.get("reason") == "OOMKilled":
        limit = pf.memory_limit(pod)
        message = (f"the trainer went over its memory limit ({limit or 'the node’s memory'}) and was killed; "
                   "create a new QLoRAJob with more spec.resources.memory, or a smaller "
                   "spec.training.batchSize or maxSeqLength")
        return AttemptState(AttemptPhase.FAILED, Reason.OOM_KILLED, message, finished_at=finished, pod=name)
    code = int(term.get("exitCode", 1))
    said = parse_termination_message(term.get("message"))
    if isinstance(said, TrainerError):
        return AttemptState(AttemptPhase.FAILED, said.reason, said.message, _retryable(code), finished_at=finished,
                            pod=name)
    tail = pf.log_tail(term.get("message"))
    if code in ExitCode._value2member_map_:
        message = tail or f"the trainer exited with code {code}"
        return AttemptState(AttemptPhase.FAILED, _exit_code_reason(code), message, _retryable(code),
                            finished_at=finished, pod=name)
    signal = f" (signal {code - 128})" if code > 128 else ""
    message = f"the trainer exited with code {code}{signal}" + (f": {tail}" if tail else "")
    return AttemptState(AttemptPhase.FAILED, Reason.TRAINER_CRASHED, message, True, finished_at=finished, pod=name)


def _ignored_by_job(pod: dict) -> bool:
    """Failures the Job's podFailurePolicy ignores (it starts a replacement pod instead)."""
    term = pf.trainer_terminated(pod)
    return pf.disruption(pod) is not None or (term is not None and term.get("exitCode") == ExitCode.INTERRUPTED)


def _verified(said) -> bool:
    """A result that names its manifest and the manifest's digest: only that proves a complete adapter."""
    return isinstance(said, TrainerResultMessage) and bool(said.result.manifest_uri and said.result.manifest_sha256)


def _published(result: TrainingResult, finished: datetime | None) -> AttemptState:
    return AttemptState(AttemptPhase.SUCCEEDED, Reason.SUCCEEDED,
                        f"adapter published to {result.adapter_uri} (manifest sha256 {result.manifest_sha256[:12]})",
                        result=result, finished_at=finished)


def _succeeded(job: dict, pods: list[dict]) -> AttemptState:
    finished = timestamps.parse((job.get("status") or {}).get("completionTime"))
    done = [p for p in pods if (pf.trainer_terminated(p) or {}).get("exitCode") == 0]
    # In a data-parallel group only index 0 (rank 0) publishes and reports the result.
    with_result = [p for p in done if isinstance(parse_termination_message(
        (pf.trainer_terminated(p) or {}).get("message")), TrainerResultMessage)]
    done = with_result or done
    term = pf.trainer_terminated(done[-1]) if done else None
    said = parse_termination_message((term or {}).get("message"))
    if _verified(said):
        return _published(said.result, finished)
    if isinstance(said, TrainerResultMessage):
        # Succeeded promises a complete adapter, and only a manifest (written last) proves one.
        return AttemptState(AttemptPhase.FAILED, Reason.RESULT_UNVERIFIED,
                            f"the trainer reported {said.result.adapter_uri} without a manifest digest, so nothing "
                            "shows the files are complete; the next attempt publishes (or finds) the manifest",
                            retryable=True, finished_at=finished)
    if not any(pf.completion_index(p) in (None, 0) for p in done):
        # The pod that reports (the only one, or a group's index 0) is gone, and its termination
        # message with it: deleted as it exited (a preemption, eviction or drain that raced the
        # trainer's last seconds) before the operator read it. The adapter is published under the
        # run's id, so the next attempt's trainer finds it and reports it in seconds, without
        # training (sft._run, checkStorage).
        return AttemptState(AttemptPhase.FAILED, Reason.RESULT_MISSING,
                            f"trainer Job {job['metadata']['name']} completed but the pod that reported its result "
                            "is gone, and the result with it (deleted as it exited); the next attempt reads the "
                            "published adapter back without training", retryable=True, finished_at=finished)
    seen = pf.log_tail((term or {}).get("message"), lines=3, chars=300) or "nothing"
    return AttemptState(AttemptPhase.FAILED, Reason.RESULT_MISSING,
                        f"the trainer exited 0 but its termination message holds no result (it said: {seen})",
                        finished_at=finished)


def result_read_back(state: AttemptState) -> bool:
    """A succeeded attempt whose result was lost with its pod: the next attempt only reads it back."""
    return state.reason == Reason.RESULT_MISSING and state.retryable


def _failed(job: dict, pods: list[dict]) -> AttemptState:
    cond = pf.condition(job, "Failed") or {}
    finished = timestamps.parse(cond.get("lastTransitionTime"))
    name = job["metadata"]["name"]
    if cond.get("reason") == "DeadlineExceeded":
        seconds = (job.get("spec") or {}).get("activeDeadlineSeconds")
        return AttemptState(AttemptPhase.FAILED, Reason.DEADLINE_EXCEEDED,
                            f"trainer Job {name} was stopped at its deadline ({seconds} s, what was left of "
                            "spec.activeDeadlineSeconds)", finished_at=finished)
    failed = [p for p in pods if (p.get("status") or {}).get("phase") == "Failed" and not _ignored_by_job(p)]
    if not failed:
        return AttemptState(AttemptPhase.FAILED, Reason.POD_LOST,
                            f"trainer Job {name} failed ({cond.get('reason')}: {cond.get('message')}) and its "
                            "pod is gone", retryable=True, finished_at=finished)
    if _workers(job) > 1:  # the pod that failed first is the cause; the others failed with their group
        failed = sorted(failed, key=lambda p: (pf.trainer_terminated(p) or {}).get("finishedAt") or "~")[:1]
    return replace(classify_pod_failure(failed[-1]), finished_at=finished)


def _pending_pod(pod: dict) -> AttemptState | None:
    """Why a pod that should be training is not, if it says."""
    name = pod["metadata"]["name"]
    unscheduled = pf.scheduling_failure(pod)
    if unscheduled and unscheduled.get("reason") == "Unschedulable":
        message = unscheduled.get("message") or "no node fits the trainer pod"
        return AttemptState(AttemptPhase.PENDING, Reason.UNSCHEDULABLE, message,
                            scheduled=("False", Reason.UNSCHEDULABLE, message), pod=name)
    scheduled = None
    node = (pod.get("spec") or {}).get("nodeName")
    if node:
        scheduled = ("True", Reason.SCHEDULED, f"trainer pod {name} is on node {node}")
    waiting = pf.trainer_waiting(pod) or {}
    why, detail = waiting.get("reason", ""), waiting.get("message", "")
    if why in pf.IMAGE_PULL_WAITING:
        return AttemptState(AttemptPhase.PENDING, Reason.IMAGE_PULL_FAILED, f"{why}: {detail}".rstrip(": "),
                            scheduled=scheduled, pod=name)
    if why in pf.CONFIG_WAITING:
        missing = pf.missing_secret(detail)
        if missing is not None:
            return AttemptState(AttemptPhase.PENDING, Reason.SECRET_NOT_FOUND, _secret_fix(pod, missing, detail),
                                scheduled=scheduled, pod=name)
        return AttemptState(AttemptPhase.PENDING, Reason.CONTAINER_CONFIG_ERROR, f"{why}: {detail}".rstrip(": "),
                            scheduled=scheduled, pod=name)
    if pf.trainer_running(pod):
        return AttemptState(AttemptPhase.RUNNING, Reason.TRAINING, f"training in pod {name} on node {node}",
                            scheduled=scheduled, pod=name)
    if pf.trainer_terminated(pod):
        return AttemptState(AttemptPhase.RUNNING, Reason.TRAINING,
                            f"the trainer in pod {name} exited; waiting for its Job to conclude",
                            scheduled=scheduled, pod=name)
    if scheduled:  # ContainerCreating, with what it waits for (a volume mount that is retried, ...)
        return AttemptState(AttemptPhase.PENDING, Reason.PENDING,
                            f"trainer pod {name} is starting ({why or 'Pending'}{': ' + detail if detail else ''})",
                            scheduled=scheduled, pod=name)
    return None


def _secret_fix(pod: dict, secret: str, said: str) -> str:
    namespace = pod["metadata"].get("namespace", "")
    return (f"{said}: create Secret {secret} in namespace {namespace} with the keys spec.output.credentialsSecretRef "
            "names (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY unless it says otherwise); the trainer pod waits "
            "and starts once it exists")


def _published_by_pod(pod: dict) -> AttemptState | None:
    """Succeeded, from a pod that exited 0 with a verified result (the manifest's URI and digest),
    whatever else happens to it:
    - before the Job controller has marked the Job (completions 1, so the Job can only complete):
      after an API server outage the Job controller may take tens of seconds to catch up (its
      watches back off), and the truth must not wait for it;
    - while the pod is being deleted: a preemption, eviction or drain that reaches the trainer while
      it publishes finds it done (it exits 0, not INTERRUPTED), and the Job completes. The pod may
      be gone by the next look, and its termination message with it: its result is read while it
      is there."""
    if (pod.get("status") or {}).get("phase") != "Succeeded":
        return None
    term = pf.trainer_terminated(pod) or {}
    said = parse_termination_message(term.get("message")) if term.get("exitCode") == 0 else None
    return _published(said.result, timestamps.parse(term.get("finishedAt"))) if _verified(said) else None


def _never_retried(pod: dict) -> AttemptState | None:
    """A one-pod attempt's failure that its ended pod decides already, before the Job controller has
    marked the Job: one that is never retried (backoffLimit 0 and a podFailurePolicy that ignores
    only disruptions and INTERRUPTED, so the Job can only fail; see _published_by_pod for why the
    truth must not wait for the Job). Anything retryable still waits for the Job, so that the next
    attempt is planned from the Job's own verdict."""
    if (pod.get("status") or {}).get("phase") not in ("Succeeded", "Failed") or _ignored_by_job(pod):
        return None
    if (pf.trainer_terminated(pod) or {}).get("exitCode") == 0:
        return None  # exit 0 decides only with a verified result (_published_by_pod)
    failed = classify_pod_failure(pod)
    return None if failed.retryable else failed


def _disrupted(pod: dict) -> AttemptState:
    cond = pf.disruption(pod) or {}
    reason = Reason.PREEMPTED if pf.is_preemption(cond) else Reason.EVICTED
    said = cond.get("message") or "is being deleted"
    message = (f"trainer pod {pod['metadata']['name']}: {said}; the Job starts a replacement pod and the trainer "
               "resumes from its last checkpoint (this does not count as an attempt)")
    return AttemptState(AttemptPhase.DISRUPTED, reason, message, pod=pod["metadata"]["name"])


def _assess_group(pods: list[dict], workers: int) -> AttemptState:
    """A data-parallel group trains only when every pod runs: until then the attempt is Pending,
    with how many workers have a node and why the others do not (the gang wait a user sees where no
    Kueue admits the Job as a whole); Running once all run."""
    current = pf.newest_per_index(pods)
    for pod in current.values():
        if pf.disruption(pod) or pod["metadata"].get("deletionTimestamp"):
            state = _disrupted(pod)
            return replace(state, message=f"{state.message.split(';')[0]}; a group cannot go on without one of its "
                                          "workers, so this attempt ends and the next one resumes the whole group "
                                          "from the newest checkpoint")
    states = {i: _pending_pod(p) for i, p in current.items()}
    for state in states.values():  # a pod that cannot start at all says so first
        if state is not None and state.reason in (Reason.IMAGE_PULL_FAILED, Reason.CONTAINER_CONFIG_ERROR):
            return state
    placed = {i: (p.get("spec") or {}).get("nodeName") for i, p in current.items() if (p.get("spec") or {}).get("nodeName")}
    running = [i for i, s in states.items() if s is not None and s.phase == AttemptPhase.RUNNING]
    if len(running) == workers:
        nodes = ", ".join(f"{i}:{placed[i]}" for i in sorted(placed))
        message = f"training on {workers} workers (index:node {nodes})"
        return AttemptState(AttemptPhase.RUNNING, Reason.TRAINING, message,
                             scheduled=("True", Reason.SCHEDULED, f"all {workers} trainer pods are on nodes ({nodes})"))
    unschedulable = [s for s in states.values() if s is not None and s.reason == Reason.UNSCHEDULABLE]
    waiting = (f"{len(placed)} of {workers} workers have a node; the group trains only when all {workers} run "
               f"together")
    if unschedulable:
        message = f"{waiting}: {unschedulable[0].message}"
        return AttemptState(AttemptPhase.PENDING, Reason.UNSCHEDULABLE, message,
                             scheduled=("False", Reason.UNSCHEDULABLE, message))
    if len(current) < workers:
        return AttemptState(AttemptPhase.PENDING, Reason.PENDING,
                             f"{waiting} (the Job controller has created {len(current)} of {workers} pods)")
    return AttemptState(AttemptPhase.PENDING, Reason.PENDING, f"{waiting}; {len(running)} of {workers} are running")


def _queued(job: dict, live: list[dict], workload: dict | None) -> AttemptState:
    """A Job that Kueue holds suspended: waiting for admission, or being stopped because Kueue
    evicted its Workload. Neither is a failure nor an attempt; the trainer resumes from its last
    checkpoint once Kueue admits the Workload again."""
    name, queue = job["metadata"]["name"], kf.queue_name(job)
    evicted = kf.eviction(workload)
    if live:
        why = f"{evicted.get('reason')}: {evicted.get('message')}" if evicted else "suspended by Kueue"
        reason = Reason.PREEMPTED if evicted and evicted.get("reason") == "Preempted" else Reason.QUEUED
        message = (f"Kueue evicted trainer Job {name} ({why}); stopping trainer pod {live[-1]['metadata']['name']} "
                   "(it saves a checkpoint first); it resumes when Kueue admits it again (this does not count as "
                   "an attempt)")
    elif workload is None:
        reason, message = Reason.QUEUED, (f"waiting for Kueue to create the Workload of trainer Job {name} "
                                          f"(LocalQueue {queue})")
    else:
        reason = Reason.QUEUED
        message = f"queued in LocalQueue {queue} (Workload {workload['metadata']['name']}): {kf.waiting_message(workload)}"
        if evicted and not kf.quota_reserved(workload):
            message += f"; evicted earlier ({evicted.get('reason')}: {evicted.get('message')})"
    return AttemptState(AttemptPhase.PENDING, reason, message, scheduled=("False", reason, message))


def assess_attempt(job: dict, pods: list[dict], workload: dict | None = None,
                   user_suspended: bool = False) -> AttemptState:
    """The state of one attempt from its Job, the Job's pods and, for a Job queued by Kueue, its
    Workload. `user_suspended` is the QLoRAJob's spec.suspend: a Job that Kueue holds suspended is
    queued, not suspended, unless the user asked for it."""
    name = job["metadata"]["name"]
    pods = pf.by_age(pods)
    finished = pf.job_finished(job)
    if finished == "Complete":
        return _succeeded(job, pods)
    if finished == "Failed":
        return _failed(job, pods)
    if (job.get("spec") or {}).get("suspend"):
        live = [p for p in pods if (p.get("status") or {}).get("phase") in ("Pending", "Running")]
        if kf.queue_name(job) and not user_suspended:
            return _queued(job, live, workload)
        message = (f"stopping trainer pod {live[-1]['metadata']['name']} (it saves a checkpoint first)" if live
                   else "suspended; the trainer resumes from its last checkpoint when spec.suspend is unset")
        return AttemptState(AttemptPhase.SUSPENDED, Reason.SUSPENDED, message)
    if not pods:
        return AttemptState(AttemptPhase.PENDING, Reason.PENDING,
                            f"waiting for the Job controller to create the pod of trainer Job {name}")
    workers = _workers(job)
    if workers > 1:
        return _assess_group(pods, workers)
    current = pods[-1]
    published = _published_by_pod(current)
    if published is None and (pf.disruption(current) or current["metadata"].get("deletionTimestamp")):
        return _disrupted(current)
    state = _pending_pod(current)
    concluded = published or _never_retried(current)
    if concluded is not None:
        return replace(concluded, scheduled=state.scheduled if state else None)
    if state is not None and state.reason != Reason.PENDING:
        return state
    earlier = [p for p in pods[:-1] if pf.disruption(p)]
    if earlier:  # the replacement of an evicted pod is not running yet
        return replace(_disrupted(earlier[-1]), scheduled=state.scheduled if state else None)
    return state or AttemptState(AttemptPhase.PENDING, Reason.PENDING,
                                 f"trainer pod {current['metadata']['name']} is waiting to be scheduled",
                                 pod=current["metadata"]["name"])


# --- the QLoRAJob's rules over all attempts ------------------------------------------------------------

@dataclass(frozen=True)
class Verdict:
    attempt: int  # the latest attempt (0: none created yet)
    state: AttemptState
    next_attempt_at: datetime | None = None  # when attempt+1 is due (it may be now or past)

    @property
    def terminal(self) -> bool:
        return self.state.phase in (AttemptPhase.SUCCEEDED, AttemptPhase.FAILED) and self.next_attempt_at is None


def retry_delay(attempt: int, settings: OperatorSettings) -> timedelta:
    return timedelta(seconds=min(settings.retry_delay * 2 ** max(attempt - 1, 0), settings.retry_delay_max))


def deadline(job: QLoRAJob, start: datetime | None) -> datetime | None:
    """When the whole QLoRAJob runs out of time (counted from its start, reset by a resume as for
    batch/v1 Jobs); None without a deadline, while suspended or before the first Job."""
    seconds = job.spec.active_deadline_seconds if job.spec else None
    if seconds is None or start is None or job.spec.suspend:
        return None
    return start + timedelta(seconds=seconds)


def job_deadline_seconds(job: QLoRAJob, start: datetime | None, job_created: datetime) -> int | None:
    """activeDeadlineSeconds of a trainer Job: what is left of the QLoRAJob's when the Job began."""
    seconds = job.spec.active_deadline_seconds if job.spec else None
    if seconds is None:
        return None
    elapsed = max(0.0, (job_created - start).total_seconds()) if start else 0.0
    return max(1, int(seconds - elapsed))


def judge(job: QLoRAJob, observed: Observed, settings: OperatorSettings, start: datetime | None) -> Verdict:
    attempt = max(job.status.attempts or 0, observed.latest_attempt)
    now = observed.now
    if attempt == 0:
        return Verdict(0, AttemptState(AttemptPhase.PENDING, Reason.PENDING, "creating the trainer Job"), now)
    trainer_job = observed.jobs.get(attempt)
    if trainer_job is None:
        state = AttemptState(AttemptPhase.FAILED, Reason.POD_LOST,
                             f"trainer Job {trainer_job_name(job.name, attempt)} of attempt {attempt} is gone",
                             retryable=True, finished_at=_noticed(job, Reason.POD_LOST) or now)
    else:
        state = assess_attempt(trainer_job, observed.pods.get(attempt, []), observed.workloads.get(attempt),
                               job.spec.suspend)
    if state.phase != AttemptPhase.FAILED:
        return Verdict(attempt, state)
    ends = deadline(job, start)
    if ends is not None and now >= ends and state.reason != Reason.DEADLINE_EXCEEDED:
        return Verdict(attempt, AttemptState(
            AttemptPhase.FAILED, Reason.DEADLINE_EXCEEDED,
            f"spec.activeDeadlineSeconds ({job.spec.active_deadline_seconds} s) ran out after attempt {attempt} "
            f"failed ({state.reason}: {state.message})", finished_at=now))
    if not state.retryable:
        return Verdict(attempt, state)
    read_back = result_read_back(state)
    # A read-back is not a retry of the training: one is allowed past backoffLimit, at once.
    if attempt > job.spec.backoff_limit + (1 if read_back else 0):
        return Verdict(attempt, replace(
            state, retryable=False,
            message=f"{state.message} (attempt {attempt}; spec.backoffLimit {job.spec.backoff_limit} reached)"))
    failed_at = state.finished_at or now
    return Verdict(attempt, state, failed_at if read_back else failed_at + retry_delay(attempt, settings))


def _noticed(job: QLoRAJob, reason: str) -> datetime | None:
    """When the status first said so: a stable time for losses that carry none of their own."""
    for cond in job.status.conditions:
        if cond.type == "Running" and cond.status == "False" and cond.reason == reason:
            return cond.last_transition_time
    return None
