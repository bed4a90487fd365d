"""A QLoRAJob queued by Kueue: the Job it renders, the status while Kueue holds it, what the
operator patches (and what it leaves to Kueue). No server; Workloads shaped as Kueue writes them."""

from qlora_api import ConditionType, Reason
from qlora_operator.conditions import find
from qlora_operator.derivation import derive_status
from qlora_operator.planning import Patch, plan_actions
from qlora_operator.rendering import render_trainer_job
from qlora_operator.settings import OperatorSettings
from support.objects import (
    QUOTA_MESSAGE,
    observe,
    pod,
    qlorajob,
    running,
    suspended,
    trainer_job,
    with_status,
    wl_cond,
    workload,
)

SETTINGS = OperatorSettings(retry_delay=0)
QUEUED = {"kueue.x-k8s.io/queue-name": "gpu-queue"}


def derive(job, jobs=(), pods=(), workloads=(), **kw):
    return derive_status(job, observe(job, jobs, pods, workloads=workloads, **kw), SETTINGS)


def plan(job, jobs=(), pods=(), workloads=()):
    observed = observe(job, jobs, pods, workloads=workloads)
    status, _ = derive_status(job, observed, SETTINGS)
    return plan_actions(job, observed, status, SETTINGS)


def cond(status, ctype):
    c = find(status, ctype)
    return (c.status, c.reason) if c else None


def test_a_queued_qlorajob_renders_a_suspended_job_with_the_queue_and_priority_labels():
    job = qlorajob(labels={**QUEUED, "kueue.x-k8s.io/priority-class": "research", "team": "nlp"},
                   spec={"resources": {"priorityClassName": "training-low"}})
    rendered = render_trainer_job(job, 1, default_image="t:1", active_deadline_seconds=None)
    labels = rendered["metadata"]["labels"]
    assert labels["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    assert labels["kueue.x-k8s.io/priority-class"] == "research"
    assert "team" not in labels  # only what Kueue reads is copied
    assert rendered["spec"]["suspend"] is True  # Kueue unsuspends it on admission
    # Kueue's workload priority without a priority-class label: the pod's PriorityClass.
    assert rendered["spec"]["template"]["spec"]["priorityClassName"] == "training-low"


def test_without_the_queue_label_the_job_is_not_kueues():
    rendered = render_trainer_job(qlorajob(), 1, default_image="t:1", active_deadline_seconds=None)
    assert not any(k.startswith("kueue.x-k8s.io/") for k in rendered["metadata"]["labels"])
    assert rendered["spec"]["suspend"] is False


def test_waiting_for_quota_is_queued_with_kueues_own_message():
    job = qlorajob(labels=QUEUED)
    tj = suspended(trainer_job(job))
    wl = workload(tj, conditions=[wl_cond("QuotaReserved", "False", "Pending", QUOTA_MESSAGE)])
    status, events = derive(job, [tj], workloads=[wl])
    assert status.phase == "Pending"
    assert cond(status, ConditionType.RUNNING) == ("False", Reason.QUEUED)
    assert cond(status, ConditionType.SCHEDULED) == ("False", Reason.QUEUED)
    assert cond(status, ConditionType.SUSPENDED) is None  # Kueue's hold is not the user's suspend
    assert "LocalQueue gpu-queue" in status.message and QUOTA_MESSAGE in status.message
    assert status.attempts == 1
    queued = [e for e in events if e.reason == Reason.QUEUED]
    assert len(queued) == 1 and queued[0].type == "Normal" and QUOTA_MESSAGE in queued[0].message


def test_before_kueue_made_the_workload_the_status_says_so():
    job = qlorajob(labels=QUEUED)
    status, _ = derive(job, [suspended(trainer_job(job))])
    assert cond(status, ConditionType.RUNNING) == ("False", Reason.QUEUED)
    assert "waiting for Kueue to create the Workload of trainer Job demo-1" in status.message


def test_preemption_by_kueue_stops_the_pod_without_a_failure_or_an_attempt():
    job = qlorajob(labels=QUEUED, spec={"backoffLimit": 0})
    tj = suspended(trainer_job(job))
    said = "Preempted to accommodate a workload (UID: 1234) due to prioritization in the ClusterQueue"
    wl = workload(tj, conditions=[wl_cond("Evicted", "True", "Preempted", said),
                                  wl_cond("QuotaReserved", "True", "QuotaReserved", "Quota reserved in ClusterQueue gpu")])
    stopping = pod(tj, phase="Running", state=running())
    status, events = derive(job, [tj], [stopping], workloads=[wl])
    assert status.phase == "Pending" and status.attempts == 1
    assert cond(status, ConditionType.RUNNING) == ("False", Reason.PREEMPTED)
    assert said in status.message and "does not count as an attempt" in status.message
    assert find(status, ConditionType.FAILED) is None
    assert plan(job, [tj], [stopping], [wl]) == []  # no new attempt despite backoffLimit 0

    # The pod is gone; Kueue requeued the workload and it waits for quota again.
    requeued = workload(tj, conditions=[wl_cond("Evicted", "True", "Preempted", said),
                                        wl_cond("QuotaReserved", "False", "Pending", QUOTA_MESSAGE)])
    status2, _ = derive(with_status(job, status), [tj], [], workloads=[requeued])
    assert cond(status2, ConditionType.RUNNING) == ("False", Reason.QUEUED)
    assert QUOTA_MESSAGE in status2.message and status2.attempts == 1
    assert said in status2.message  # why it is back in the queue

    # Admitted again; for a moment the Job is still suspended: the eviction is history now.
    readmitted = workload(tj, conditions=[wl_cond("Evicted", "True", "Preempted", said),
                                          wl_cond("QuotaReserved", "True", "QuotaReserved", "ok"),
                                          wl_cond("Admitted", "True", "Admitted", "ok")])
    status3, _ = derive(with_status(job, status2), [tj], [], workloads=[readmitted])
    assert status3.message.endswith("admitted; Kueue is starting the Job") and said not in status3.message


def test_admission_unsuspends_and_the_same_attempt_runs():
    job = qlorajob(labels=QUEUED)
    tj = suspended(trainer_job(job))
    wl = workload(tj, conditions=[wl_cond("QuotaReserved", "False", "Pending", QUOTA_MESSAGE)])
    queued, _ = derive(job, [tj], workloads=[wl])
    tj["spec"]["suspend"] = False
    admitted = workload(tj, conditions=[wl_cond("QuotaReserved", "True", "QuotaReserved", "ok"),
                                        wl_cond("Admitted", "True", "Admitted", "ok")])
    status, _ = derive(with_status(job, queued), [tj], [pod(tj, phase="Running", state=running())],
                       workloads=[admitted])
    assert status.phase == "Running" and status.attempts == 1
    assert cond(status, ConditionType.SCHEDULED) == ("True", Reason.SCHEDULED)


def test_the_operator_never_touches_the_suspend_of_a_job_kueue_holds():
    job = qlorajob(labels=QUEUED)
    tj = suspended(trainer_job(job))
    wl = workload(tj, conditions=[wl_cond("QuotaReserved", "False", "Pending", QUOTA_MESSAGE)])
    assert plan(job, [tj], workloads=[wl]) == []


def test_the_users_suspend_deactivates_the_workload_and_unsuspend_requeues_it():
    job = qlorajob(labels=QUEUED, spec={"suspend": True}, generation=2)
    tj = trainer_job(job)
    tj["spec"]["suspend"] = False  # admitted and running
    admitted = workload(tj, conditions=[wl_cond("Admitted", "True", "Admitted", "ok")])
    actions = plan(job, [tj], [pod(tj, phase="Running", state=running())], [admitted])
    assert actions == [Patch("Workload", admitted["metadata"]["name"], {"spec": {"active": False}}, "")]

    # Kueue evicted it (Deactivated) and suspended the Job: the status is the user's Suspended.
    suspended(tj)
    inactive = workload(tj, active=False, conditions=[wl_cond("Evicted", "True", "Deactivated", "deactivated")])
    status, _ = derive(job, [tj], workloads=[inactive])
    assert status.phase == "Suspended" and cond(status, ConditionType.SUSPENDED) == ("True", Reason.SUSPENDED)
    assert plan(job, [tj], workloads=[inactive]) == []

    resumed = with_status(qlorajob(labels=QUEUED, generation=3), status)
    assert plan(resumed, [tj], workloads=[inactive]) == [
        Patch("Workload", inactive["metadata"]["name"], {"spec": {"active": True}}, "")]
