"""derive_status(job, observed) -> (status, events): the QLoRAJob's status from its children. Pure.

The status is a function of the observed children and the previous status only where the
children cannot say it any more: a terminal status is final (a TTL may delete the finished Job,
the result stays), the attempt count never goes down, and lastTransitionTime only moves when a
condition's status changes. Events are the differences between the old and the new conditions,
so a replayed event or a restarted operator derives the same status and emits nothing.
"""

from dataclasses import dataclass

from qlora_api import ConditionType, QLoRAJobStatus, Reason, TrainingProgress, TrainingResult

from qlora_operator import group, rendezvous, timestamps
from qlora_operator.attempts import AttemptPhase, Verdict, judge, result_read_back
from qlora_operator.conditions import find, is_terminal, is_true, set_condition
from qlora_operator.kstatus_conditions import KSTATUS_CONDITION_TYPES, set_kstatus_conditions
from qlora_operator.naming import trainer_job_name
from qlora_operator.observation import Observed
from qlora_operator.resource import QLoRAJob
from qlora_operator.settings import DEFAULTS, OperatorSettings

NORMAL_REASONS = {Reason.ACCEPTED, Reason.PENDING, Reason.QUEUED, Reason.SCHEDULED, Reason.TRAINING,
                  Reason.SUSPENDED, Reason.RESUMED, Reason.COMPLETED, Reason.SUCCEEDED}
QUIET_REASONS = {Reason.PENDING, Reason.COMPLETED}
EVENT_MESSAGE_LIMIT = 1024


@dataclass(frozen=True)
class OperatorEvent:
    type: str  # Normal or Warning
    reason: str
    message: str


def derive_status(job: QLoRAJob, observed: Observed,
                  settings: OperatorSettings = DEFAULTS) -> tuple[QLoRAJobStatus, list[OperatorEvent]]:
    old = job.status
    new = old.model_copy(deep=True)
    now, gen = observed.now, job.generation
    new.observed_generation = gen  # seen, even when finished (a later TTL change still applies)
    if is_terminal(old):
        set_kstatus_conditions(new, gen, now)  # once, for jobs that finished before these conditions existed
        return new, []
    if job.spec is None:
        for ctype in (ConditionType.ACCEPTED, ConditionType.FAILED):
            set_condition(new, ctype, ctype == ConditionType.FAILED, Reason.INVALID_SPEC, job.spec_error or "", gen, now)
        new.phase, new.message, new.completion_time = "Failed", job.spec_error, now
        set_kstatus_conditions(new, gen, now)
        return new, transition_events(old, new)
    set_condition(new, ConditionType.ACCEPTED, True, Reason.ACCEPTED, "the spec is valid", gen, now)

    verdict = judge(job, observed, settings, _start_time(observed, old))
    new.start_time = _start_time(observed, old, verdict)
    new.attempts = verdict.attempt
    new.job_name = trainer_job_name(job.name, verdict.attempt) if verdict.attempt else None
    _apply_verdict(new, verdict, job, gen, now)
    new.world_size = rendezvous.world_size(job)
    if job.spec.resources.workers > 1:
        new.workers = group.workers_of(observed.pods.get(verdict.attempt, []))
    if observed.progress is not None:
        new.progress = _with_summary(observed.progress)
    set_kstatus_conditions(new, gen, now)
    return new, transition_events(old, new)


def _start_time(observed: Observed, old: QLoRAJobStatus, verdict: Verdict | None = None):
    """When the first trainer Job was created; a resume starts the clock again (as batch/v1 does)."""
    resumed = verdict is not None and verdict.state.phase != AttemptPhase.SUSPENDED
    if resumed and is_true(old, ConditionType.SUSPENDED):
        return observed.now
    if old.start_time is not None:
        return old.start_time
    first = observed.jobs.get(min(observed.jobs, default=0))
    return timestamps.parse(first["metadata"].get("creationTimestamp")) if first else None


def _apply_verdict(new: QLoRAJobStatus, verdict: Verdict, job: QLoRAJob, gen: int, now) -> None:
    state = verdict.state

    def cond(ctype: str, value: bool | str, reason: str, message: str) -> None:
        set_condition(new, ctype, value, reason, message, gen, now)

    if state.scheduled:
        cond(ConditionType.SCHEDULED, *state.scheduled)
    if state.phase != AttemptPhase.SUSPENDED and is_true(new, ConditionType.SUSPENDED):
        cond(ConditionType.SUSPENDED, False, Reason.RESUMED, "resumed; the trainer continues from its last checkpoint")

    if state.phase == AttemptPhase.RUNNING:
        new.phase = "Running"
        cond(ConditionType.RUNNING, True, state.reason, state.message)
    elif state.phase in (AttemptPhase.PENDING, AttemptPhase.DISRUPTED):
        new.phase = "Pending"
        cond(ConditionType.RUNNING, False, state.reason, state.message)
    elif state.phase == AttemptPhase.SUSPENDED:
        new.phase = "Suspended"
        cond(ConditionType.SUSPENDED, True, Reason.SUSPENDED, state.message)
        cond(ConditionType.RUNNING, False, Reason.SUSPENDED, state.message)
    elif state.phase == AttemptPhase.SUCCEEDED:
        new.phase, new.result = "Succeeded", with_serving_facts(state.result, job)
        new.completion_time = state.finished_at or now
        cond(ConditionType.RUNNING, False, Reason.COMPLETED, "the trainer finished")
        cond(ConditionType.SUCCEEDED, True, state.reason, state.message)
    elif verdict.next_attempt_at is not None:  # a retryable failure
        new.phase = "Pending"
        when = "now" if verdict.next_attempt_at <= now else f"at {timestamps.format(verdict.next_attempt_at)}"
        # a read-back is not a failure of the training, and backoffLimit does not count it
        said, of = ("", "") if result_read_back(state) else (" failed", f" of {job.spec.backoff_limit + 1}")
        cond(ConditionType.RUNNING, False, state.reason,
             f"attempt {verdict.attempt}{said}: {state.message}; attempt {verdict.attempt + 1}{of} starts {when}")
    else:
        new.phase = "Failed"
        new.completion_time = state.finished_at or now
        cond(ConditionType.RUNNING, False, state.reason, state.message)
        cond(ConditionType.FAILED, True, state.reason, state.message)
    driving = find(new, {"Succeeded": ConditionType.SUCCEEDED, "Failed": ConditionType.FAILED}.get(
        new.phase, ConditionType.RUNNING))
    new.message = driving.message if driving else None


# Significant digits kept in status.progress: `kubectl get` prints a number column as stored, and a
# loss of 0.41234567890123456 says no more than 0.4123 (the trainer's log keeps every digit).
PROGRESS_DIGITS = {"loss": 4, "eval_loss": 4, "learning_rate": 3, "tokens_per_second": 4, "mfu": 3,
                   "gpu_memory_gib": 3, "epoch": 4}


def _significant(value: float | None, digits: int) -> float | None:
    return None if value is None else float(f"{value:.{digits}g}")


def with_serving_facts(result: TrainingResult | None, job: QLoRAJob) -> TrainingResult | None:
    """The base model and LoRA rank a server needs, from the spec where the trainer did not say
    them (an older trainer image); what the trainer reports wins, since it saw the resolved model."""
    if result is None:
        return None
    uri = job.spec.model.uri
    return result.model_copy(update={
        "base_model": result.base_model or (uri.removeprefix("hf://") if uri.startswith("hf://") else uri),
        "base_model_revision": result.base_model_revision or job.spec.model.revision,
        "lora_rank": result.lora_rank or job.spec.lora.r,
        "lora_alpha": result.lora_alpha or job.spec.lora.alpha,
    })


def _with_summary(progress: TrainingProgress) -> TrainingProgress:
    update = {k: _significant(getattr(progress, k), d) for k, d in PROGRESS_DIGITS.items()}
    if not progress.summary and progress.total_steps:
        percent = 100 * progress.step // progress.total_steps
        update["summary"] = f"{progress.step}/{progress.total_steps} ({percent}%)"
    return progress.model_copy(update=update)


def transition_events(old: QLoRAJobStatus, new: QLoRAJobStatus) -> list[OperatorEvent]:
    """One Event per condition whose status or reason changed (deduplicated: Running=False and
    Failed=True with the same reason are one story)."""
    events: list[OperatorEvent] = []
    seen = set()
    for cond in new.conditions:
        before = find(old, cond.type)
        if before is not None and (before.status, before.reason) == (cond.status, cond.reason):
            continue
        if cond.type in KSTATUS_CONDITION_TYPES:
            continue  # summaries of the conditions that tell the story
        if cond.reason in QUIET_REASONS or (cond.type == ConditionType.SCHEDULED and cond.status == "True"):
            continue  # said better by another event (JobCreated, Succeeded, the scheduler's own)
        if cond.reason in seen:
            continue
        seen.add(cond.reason)
        kind = "Normal" if cond.reason in NORMAL_REASONS else "Warning"
        events.append(OperatorEvent(kind, cond.reason, cond.message[:EVENT_MESSAGE_LIMIT]))
    return events
