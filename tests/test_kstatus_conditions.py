"""Ready, Reconciling and Stalled: the summary conditions kstatus (Flux) reads, beside the operator's own.

No server: derive_status over observed children, as in test_reconcile_derivation.py. That kstatus
itself computes Current / InProgress / Failed from them is tested with the real library on live
objects in test_gitops_health.py.
"""

from qlora_api import ConditionType, ExitCode, QLoRAJobStatus, Reason
from qlora_operator.conditions import find, set_condition
from qlora_operator.derivation import derive_status
from qlora_operator.kstatus_conditions import KSTATUS_CONDITION_TYPES, set_kstatus_conditions
from qlora_operator.settings import OperatorSettings
from support.objects import (
    error_message,
    observe,
    pod,
    qlorajob,
    result_message,
    running,
    terminated,
    trainer_job,
    unschedulable,
    with_status,
)

NO_DELAY = OperatorSettings(retry_delay=0)


def derive(job, jobs=(), pods=(), **kw):
    return derive_status(job, observe(job, jobs, pods, **kw), NO_DELAY)


def summary(status) -> dict[str, tuple[str, str]]:
    """{type: (status, reason)} of the kstatus conditions present."""
    return {c.type: (c.status, c.reason) for c in status.conditions if c.type in KSTATUS_CONDITION_TYPES}


def own(status) -> list[tuple[str, str, str, str]]:
    return [(c.type, c.status, c.reason, c.message) for c in status.conditions if c.type not in KSTATUS_CONDITION_TYPES]


def test_a_new_job_is_reconciling_and_not_ready():
    status, events = derive(qlorajob())
    assert summary(status) == {"Ready": ("False", Reason.PENDING), "Reconciling": ("True", Reason.PENDING)}
    assert [e.reason for e in events] == [Reason.ACCEPTED]  # summaries are not news: no Events of their own


def test_an_unschedulable_pod_is_the_reason_while_reconciling():
    job = qlorajob()
    tj = trainer_job(job)
    said = "0/1 nodes are available: 1 Insufficient nvidia.com/gpu."
    status, _ = derive(job, [tj], [pod(tj, node=None, conditions=[unschedulable(said)])])
    assert summary(status) == {"Ready": ("False", Reason.UNSCHEDULABLE),
                               "Reconciling": ("True", Reason.UNSCHEDULABLE)}
    assert find(status, ConditionType.RECONCILING).message == said


def test_running_is_reconciling_with_the_training_reason():
    job = qlorajob()
    tj = trainer_job(job)
    status, _ = derive(job, [tj], [pod(tj, phase="Running", state=running())])
    assert status.phase == "Running"
    assert summary(status) == {"Ready": ("False", Reason.TRAINING), "Reconciling": ("True", Reason.TRAINING)}


def test_a_retryable_failure_is_still_reconciling_not_stalled():
    job = qlorajob(spec={"backoffLimit": 2})
    tj = trainer_job(job, finished="Failed")
    said = error_message("StorageUnavailable", "S3 answered 503", ExitCode.STORAGE_UNAVAILABLE)
    status, _ = derive(job, [tj], [pod(tj, phase="Failed", state=terminated(int(ExitCode.STORAGE_UNAVAILABLE), said))])
    assert summary(status) == {"Ready": ("False", "StorageUnavailable"), "Reconciling": ("True", "StorageUnavailable")}


def test_success_is_ready_and_drops_reconciling():
    job = qlorajob()
    tj = trainer_job(job)
    running_status, _ = derive(job, [tj], [pod(tj, phase="Running", state=running())])
    done_tj = trainer_job(job, finished="Complete", finished_at=60)
    status, _ = derive(with_status(job, running_status), [done_tj],
                       [pod(done_tj, phase="Succeeded", state=terminated(0, result_message()))], now=200)
    assert summary(status) == {"Ready": ("True", Reason.SUCCEEDED)}
    ready = find(status, ConditionType.READY)
    assert ready.message == find(status, ConditionType.SUCCEEDED).message
    assert ready.last_transition_time != find(running_status, ConditionType.READY).last_transition_time


def test_a_permanent_failure_is_stalled_with_its_reason():
    job = qlorajob(spec={"backoffLimit": 3})
    tj = trainer_job(job, finished="Failed")
    said = error_message("BadData", "train.jsonl line 7: no 'messages' key", ExitCode.BAD_DATA)
    status, _ = derive(job, [tj], [pod(tj, phase="Failed", state=terminated(int(ExitCode.BAD_DATA), said))])
    assert summary(status) == {"Ready": ("False", "BadData"), "Stalled": ("True", "BadData")}
    assert find(status, ConditionType.STALLED).message == "train.jsonl line 7: no 'messages' key"


def test_an_invalid_spec_is_stalled():
    status, _ = derive(qlorajob(spec={"lora": {"targetModules": ["all-linear", "q_proj"]}}))
    assert summary(status) == {"Ready": ("False", Reason.INVALID_SPEC), "Stalled": ("True", Reason.INVALID_SPEC)}


def test_suspended_is_not_ready_and_not_reconciling():
    job = qlorajob(spec={"suspend": True})
    tj = trainer_job(job)
    tj["spec"]["suspend"] = True
    status, _ = derive(job, [tj], [])
    assert status.phase == "Suspended"
    # InProgress for kstatus through Ready=False alone: see kstatus_conditions.py for why.
    assert summary(status) == {"Ready": ("False", Reason.SUSPENDED)}


def test_the_operators_own_conditions_are_unchanged_by_the_summaries():
    from qlora_operator import derivation

    job = qlorajob()
    tj = trainer_job(job)
    status, _ = derive(job, [tj], [pod(tj, phase="Running", state=running())])
    assert [t for t, *_ in own(status)] == ["Accepted", "Scheduled", "Running"]
    assert own(status) == [(c.type, c.status, c.reason, c.message) for c in status.conditions[:3]]
    assert derivation.KSTATUS_CONDITION_TYPES == {"Ready", "Reconciling", "Stalled"}


def test_a_job_that_finished_before_the_summaries_existed_gets_them_once():
    job = qlorajob()
    tj = trainer_job(job, finished="Complete")
    done, _ = derive(job, [tj], [pod(tj, phase="Succeeded", state=terminated(0, result_message()))])
    legacy = done.model_copy(deep=True)
    legacy.conditions = [c for c in legacy.conditions if c.type not in KSTATUS_CONDITION_TYPES]
    upgraded, events = derive(with_status(job, legacy), [], [], now=5000)
    assert summary(upgraded) == {"Ready": ("True", Reason.SUCCEEDED)}
    assert events == []
    again, _ = derive(with_status(job, upgraded), [], [], now=6000)
    assert again == upgraded  # no churn afterwards


def test_a_queue_holding_the_job_is_the_reason_while_reconciling():
    # Kueue's admission wait, as the operator reports it: Scheduled and Running False, reason Queued.
    status = QLoRAJobStatus(phase="Pending")
    said = "queued in LocalQueue team-a (Workload job-demo-1-3f2a1): insufficient unused quota for nvidia.com/gpu"
    now = observe(qlorajob()).now
    set_condition(status, ConditionType.ACCEPTED, True, Reason.ACCEPTED, "the spec is valid", 1, now)
    for ctype in (ConditionType.SCHEDULED, ConditionType.RUNNING):
        set_condition(status, ctype, False, "Queued", said, 1, now)
    set_kstatus_conditions(status, 1, now)
    assert summary(status) == {"Ready": ("False", "Queued"), "Reconciling": ("True", "Queued")}
    assert find(status, ConditionType.RECONCILING).message == said
