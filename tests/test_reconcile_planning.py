"""plan_actions: which children to create or patch, from the spec and what exists. No server."""

from qlora_api import ExitCode
from qlora_operator.derivation import derive_status
from qlora_operator.planning import Create, Patch, plan_actions
from qlora_operator.settings import OperatorSettings
from support.objects import (
    config_map_for,
    observe,
    pod,
    qlorajob,
    result_message,
    running,
    terminated,
    trainer_job,
)

SETTINGS = OperatorSettings(retry_delay=0, trainer_image="registry.example/trainer:9")


def plan(job, jobs=(), pods=(), settings=SETTINGS, **kw):
    observed = observe(job, jobs, pods, **kw)
    status, _ = derive_status(job, observed, settings)
    return plan_actions(job, observed, status, settings)


def test_a_new_job_gets_its_config_and_first_trainer_job():
    actions = plan(qlorajob(spec={"activeDeadlineSeconds": 3600}))
    assert [(type(a), a.kind, a.name) for a in actions] == [(Create, "ConfigMap", "demo-1-config"),
                                                           (Create, "Job", "demo-1")]
    job = actions[1].obj
    assert job["spec"]["activeDeadlineSeconds"] == 3600
    assert job["spec"]["template"]["spec"]["containers"][0]["image"] == "registry.example/trainer:9"


def test_a_running_job_needs_nothing():
    job = qlorajob(spec={"activeDeadlineSeconds": 3600})
    tj = trainer_job(job, deadline=3600)
    assert plan(job, [tj], [pod(tj, phase="Running", state=running())]) == []


def test_suspend_is_mirrored_into_the_job():
    job = qlorajob(spec={"suspend": True}, generation=2)
    tj = trainer_job(job)
    tj["spec"]["suspend"] = False
    actions = plan(job, [tj], [pod(tj, phase="Running", state=running())])
    assert actions == [Patch("Job", "demo-1", {"spec": {"suspend": True}}, "")]


def test_a_changed_deadline_reaches_the_running_job_as_what_is_left():
    job = qlorajob(spec={"activeDeadlineSeconds": 1000}, generation=2)
    tj = trainer_job(job, created=1, deadline=3600)
    actions = plan(job, [tj], [pod(tj, phase="Running", state=running())])
    # The QLoRAJob started when its first Job was created (t=1), so the Job has all 1000 s.
    assert actions == [Patch("Job", "demo-1", {"spec": {"activeDeadlineSeconds": 1000}}, "")]


def test_a_retry_creates_the_next_attempt_with_the_remaining_deadline():
    job = qlorajob(spec={"activeDeadlineSeconds": 1000, "backoffLimit": 2})
    tj = trainer_job(job, finished="Failed", finished_at=90, deadline=1000)
    pods = [pod(tj, phase="Failed", state=terminated(int(ExitCode.UNEXPECTED)))]
    actions = plan(job, [tj], pods, now=101)
    assert [(a.kind, a.name) for a in actions] == [("ConfigMap", "demo-2-config"), ("Job", "demo-2")]
    assert actions[1].obj["spec"]["activeDeadlineSeconds"] == 900  # started at t=1, now t=101
    config = actions[0].obj["data"]["config.json"]
    assert '"attempt": 2' in config and job.uid in config


def test_a_retry_waits_for_its_back_off():
    job = qlorajob()
    tj = trainer_job(job, finished="Failed", finished_at=95)
    pods = [pod(tj, phase="Failed", state=terminated(int(ExitCode.UNEXPECTED)))]
    assert plan(job, [tj], pods, now=100, settings=OperatorSettings(retry_delay=10)) == []
    assert len(plan(job, [tj], pods, now=106, settings=OperatorSettings(retry_delay=10))) == 2


def test_permanent_failures_create_nothing():
    job = qlorajob(spec={"backoffLimit": 5})
    tj = trainer_job(job, finished="Failed")
    assert plan(job, [tj], [pod(tj, phase="Failed", state=terminated(int(ExitCode.BAD_DATA)))]) == []


def test_ttl_goes_onto_the_finished_job_once_the_status_holds_the_result():
    job = qlorajob(spec={"ttlSecondsAfterFinished": 600})
    tj = trainer_job(job, finished="Complete")
    actions = plan(job, [tj], [pod(tj, phase="Succeeded", state=terminated(0, result_message()))])
    assert actions == [Patch("Job", "demo-1", {"spec": {"ttlSecondsAfterFinished": 600}}, "")]
    tj["spec"]["ttlSecondsAfterFinished"] = 600
    assert plan(job, [tj], [pod(tj, phase="Succeeded", state=terminated(0, result_message()))]) == []


def test_no_ttl_while_the_job_is_still_going():
    job = qlorajob(spec={"ttlSecondsAfterFinished": 0})
    tj = trainer_job(job)
    assert plan(job, [tj], [pod(tj, phase="Running", state=running())]) == []


def test_a_config_map_deleted_by_hand_comes_back_while_the_attempt_runs():
    job = qlorajob()
    tj = trainer_job(job)
    actions = plan(job, [tj], [pod(tj)], config_maps=[])
    assert [(a.kind, a.name) for a in actions] == [("ConfigMap", "demo-1-config")]


def test_children_of_an_earlier_qlorajob_with_the_same_name_are_not_adopted():
    old = qlorajob(uid="11111111-0000-4000-8000-000000000000")
    new = qlorajob()
    leftover = trainer_job(old, finished="Complete")
    actions = plan(new, [leftover], [], config_maps=[config_map_for(old, 1)])
    assert [(a.kind, a.name) for a in actions] == [("ConfigMap", "demo-1-config"), ("Job", "demo-1")]
