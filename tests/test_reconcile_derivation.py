"""derive_status: every way a trainer pod can end up, as the condition a human acts on. No server."""

import pytest
from qlora_api import ConditionType, ExitCode, Reason, TrainerResultMessage, TrainingProgress, TrainingResult
from qlora_operator.conditions import find
from qlora_operator.derivation import derive_status
from qlora_operator.settings import OperatorSettings
from support.objects import (
    disruption,
    error_message,
    observe,
    pod,
    qlorajob,
    result_message,
    running,
    terminated,
    trainer_job,
    unschedulable,
    waiting,
    with_status,
)

NO_DELAY = OperatorSettings(retry_delay=0)


def cond(status, ctype):
    c = find(status, ctype)
    return (c.status, c.reason) if c else None


def derive(job, jobs=(), pods=(), **kw):
    return derive_status(job, observe(job, jobs, pods, **kw), kw.pop("settings", NO_DELAY))


def test_a_new_job_is_accepted_and_pending_before_its_first_trainer_job():
    status, events = derive(qlorajob())
    assert status.phase == "Pending"
    assert status.attempts == 0
    assert cond(status, ConditionType.ACCEPTED) == ("True", Reason.ACCEPTED)
    assert [e.reason for e in events] == [Reason.ACCEPTED]  # JobCreated follows from the plan


def test_unschedulable_carries_the_schedulers_own_message():
    job = qlorajob()
    tj = trainer_job(job)
    said = "0/1 nodes are available: 1 node(s) didn't match Pod's node affinity/selector."
    status, events = derive(job, [tj], [pod(tj, node=None, conditions=[unschedulable(said)])])
    assert status.phase == "Pending"
    assert cond(status, ConditionType.SCHEDULED) == ("False", Reason.UNSCHEDULABLE)
    assert find(status, ConditionType.SCHEDULED).message == said
    assert status.message == said
    warning = [e for e in events if e.reason == Reason.UNSCHEDULABLE]
    assert warning and warning[0].type == "Warning" and warning[0].message == said


@pytest.mark.parametrize("kubelet_reason", ["ErrImagePull", "ImagePullBackOff", "InvalidImageName"])
def test_image_pull_errors_become_image_pull_failed(kubelet_reason):
    job = qlorajob()
    tj = trainer_job(job)
    p = pod(tj, state=waiting(kubelet_reason, 'Back-off pulling image "nope:1"'))
    status, _ = derive(job, [tj], [p])
    assert cond(status, ConditionType.RUNNING) == ("False", Reason.IMAGE_PULL_FAILED)
    assert kubelet_reason in status.message and "nope:1" in status.message
    assert status.phase == "Pending"
    assert cond(status, ConditionType.SCHEDULED) == ("True", Reason.SCHEDULED)


@pytest.mark.parametrize("kubelet_said", ['secret "s3-creds" not found',
                                          "couldn't find key AWS_ACCESS_KEY_ID in Secret ml/s3-creds"])
def test_a_missing_credentials_secret_has_its_own_reason_and_says_what_to_create(kubelet_said):
    job = qlorajob()
    tj = trainer_job(job)
    p = pod(tj, state=waiting("CreateContainerConfigError", kubelet_said))
    status, events = derive(job, [tj], [p])
    assert cond(status, ConditionType.RUNNING) == ("False", Reason.SECRET_NOT_FOUND)
    assert status.phase == "Pending"  # it starts once the Secret exists
    assert kubelet_said in status.message and "create Secret s3-creds in namespace ml" in status.message
    assert [e.reason for e in events if e.type == "Warning"] == [Reason.SECRET_NOT_FOUND]


def test_another_container_config_error_keeps_the_generic_reason():
    job = qlorajob()
    tj = trainer_job(job)
    p = pod(tj, state=waiting("CreateContainerConfigError", 'configmap "demo-1-config" not found'))
    status, _ = derive(job, [tj], [p])
    assert cond(status, ConditionType.RUNNING) == ("False", Reason.CONTAINER_CONFIG_ERROR)


def test_running_trainer_with_progress():
    job = qlorajob()
    tj = trainer_job(job)
    progress = TrainingProgress(step=30, total_steps=120, loss=1.25)
    status, events = derive(job, [tj], [pod(tj, phase="Running", state=running())], progress=progress)
    assert status.phase == "Running"
    assert cond(status, ConditionType.RUNNING) == ("True", Reason.TRAINING)
    assert status.progress.step == 30 and status.progress.summary == "30/120 (25%)"
    assert status.job_name == "demo-1" and status.attempts == 1
    assert Reason.TRAINING in [e.reason for e in events]


def test_success_publishes_the_result():
    job = qlorajob()
    tj = trainer_job(job, finished="Complete", finished_at=60)
    p = pod(tj, phase="Succeeded", state=terminated(0, result_message("s3://adapters/x/run/")))
    status, events = derive(job, [tj], [p])
    assert status.phase == "Succeeded"
    assert cond(status, ConditionType.SUCCEEDED) == ("True", Reason.SUCCEEDED)
    assert status.result.adapter_uri == "s3://adapters/x/run/"
    assert status.completion_time is not None and status.completion_time.minute == 1
    assert "s3://adapters/x/run/" in status.message
    assert any(e.reason == Reason.SUCCEEDED and e.type == "Normal" for e in events)


def test_exit_zero_without_a_result_is_not_success():
    job = qlorajob()
    tj = trainer_job(job, finished="Complete")
    status, _ = derive(job, [tj], [pod(tj, phase="Succeeded", state=terminated(0, "done!"))])
    assert status.phase == "Failed"
    assert cond(status, ConditionType.FAILED) == ("True", Reason.RESULT_MISSING)


@pytest.mark.parametrize("job_finished", [None, "Complete"])
def test_a_trainer_that_published_as_it_was_preempted_succeeds(job_finished):
    """The scheduler (or an eviction, a drain) reached the trainer while it published: it exited 0
    with its result, not INTERRUPTED, and the Job completes. Its pod is being deleted, so this look
    may be the last one at its termination message: the result is taken now."""
    job = qlorajob()
    tj = trainer_job(job, finished=job_finished)
    p = pod(tj, phase="Succeeded", state=terminated(0, result_message("s3://adapters/x/run/")),
            conditions=[disruption("PreemptionByScheduler", "preempted by urgent")], deleting=True)
    status, _ = derive(job, [tj], [p])
    assert status.phase == "Succeeded", status.message
    assert status.result.adapter_uri == "s3://adapters/x/run/" and status.attempts == 1


def test_a_completed_job_whose_pod_is_gone_reads_its_result_back_in_one_more_attempt():
    """The pod went (deleted as it exited) before the operator read its result: not a failure of
    the training, so one attempt more reads the published adapter back, at once and even past
    backoffLimit; a second loss in a row fails, as any retry would."""
    job = qlorajob(spec={"backoffLimit": 0})
    first = trainer_job(job, finished="Complete", finished_at=60)
    status, _ = derive(job, [first], [], now=61)
    assert status.phase == "Pending", status.message
    assert cond(status, ConditionType.RUNNING) == ("False", Reason.RESULT_MISSING)
    assert "is gone" in status.message and "attempt 2 starts now" in status.message
    second = trainer_job(job, 2, created=62, finished="Complete", finished_at=70)
    read = pod(second, "fghij", created=63, phase="Succeeded", state=terminated(0, result_message("s3://a/run/")))
    done, _ = derive(with_status(job, status), [first, second], [read], now=71)
    assert done.phase == "Succeeded" and done.attempts == 2 and done.result.adapter_uri == "s3://a/run/"
    lost_again, _ = derive(with_status(job, status), [first, second], [], now=71)
    assert lost_again.phase == "Failed" and "backoffLimit 0 reached" in lost_again.message


def test_oom_killed_fails_at_once_with_a_hint():
    job = qlorajob(spec={"resources": {"memory": "8Gi"}, "backoffLimit": 5})
    tj = trainer_job(job, finished="Failed")
    p = pod(tj, phase="Failed", state=terminated(137, reason="OOMKilled"))
    status, events = derive(job, [tj], [p])
    assert status.phase == "Failed"
    assert cond(status, ConditionType.FAILED) == ("True", Reason.OOM_KILLED)
    assert "8Gi" in status.message and "spec.resources.memory" in status.message
    assert [e.reason for e in events if e.type == "Warning"] == [Reason.OOM_KILLED]


def test_a_trainer_error_lends_its_reason_and_message():
    job = qlorajob(spec={"backoffLimit": 3})
    tj = trainer_job(job, finished="Failed")
    said = error_message("BadData", "train.jsonl line 7: no 'messages' key", ExitCode.BAD_DATA)
    p = pod(tj, phase="Failed", state=terminated(int(ExitCode.BAD_DATA), said))
    status, _ = derive(job, [tj], [p])
    assert status.phase == "Failed"
    assert cond(status, ConditionType.FAILED) == ("True", "BadData")
    assert status.message == "train.jsonl line 7: no 'messages' key"


def test_a_retryable_failure_plans_the_next_attempt():
    job = qlorajob(spec={"backoffLimit": 2})
    tj = trainer_job(job, finished="Failed")
    said = error_message("StorageUnavailable", "S3 endpoint refused the connection", ExitCode.STORAGE_UNAVAILABLE)
    p = pod(tj, phase="Failed", state=terminated(int(ExitCode.STORAGE_UNAVAILABLE), said))
    status, events = derive(job, [tj], [p])
    assert status.phase == "Pending"
    assert cond(status, ConditionType.FAILED) is None
    assert cond(status, ConditionType.RUNNING) == ("False", "StorageUnavailable")
    assert "attempt 2 of 3 starts now" in status.message
    assert any(e.type == "Warning" and e.reason == "StorageUnavailable" for e in events)


def test_the_retry_waits_for_its_back_off():
    job = qlorajob(spec={"backoffLimit": 2})
    tj = trainer_job(job, finished="Failed", finished_at=95)
    p = pod(tj, phase="Failed", state=terminated(int(ExitCode.STORAGE_UNAVAILABLE)))
    status, _ = derive_status(job, observe(job, [tj], [p], now=100), OperatorSettings(retry_delay=10))
    assert "starts at 2026-11-25T12:01:45Z" in status.message


def test_retries_stop_at_the_backoff_limit():
    job = qlorajob(spec={"backoffLimit": 1})
    jobs = [trainer_job(job, 1, finished="Failed"), trainer_job(job, 2, created=70, finished="Failed", finished_at=90)]
    pods = [pod(jobs[0], phase="Failed", state=terminated(5)),
            pod(jobs[1], "fghij", phase="Failed", state=terminated(5))]
    status, _ = derive(job, jobs, pods)
    assert status.phase == "Failed"
    assert status.attempts == 2
    assert cond(status, ConditionType.FAILED) == ("True", "StorageUnavailable")
    assert "backoffLimit 1 reached" in status.message


def test_an_unknown_exit_code_is_a_retryable_crash():
    job = qlorajob()
    tj = trainer_job(job, finished="Failed")
    status, _ = derive(job, [tj], [pod(tj, phase="Failed", state=terminated(139, "Segmentation fault"))])
    assert cond(status, ConditionType.RUNNING) == ("False", Reason.TRAINER_CRASHED)
    assert "signal 11" in status.message and "Segmentation fault" in status.message
    assert status.phase == "Pending"


def test_the_jobs_own_deadline_fails_the_qlorajob():
    job = qlorajob(spec={"activeDeadlineSeconds": 600})
    tj = trainer_job(job, finished="Failed", reason="DeadlineExceeded", deadline=600)
    status, _ = derive(job, [tj], [])
    assert status.phase == "Failed"
    assert cond(status, ConditionType.FAILED) == ("True", Reason.DEADLINE_EXCEEDED)


def test_the_deadline_counts_across_attempts():
    job = qlorajob(spec={"activeDeadlineSeconds": 60, "backoffLimit": 3})
    tj = trainer_job(job, finished="Failed", finished_at=50)
    status, _ = derive(job, [tj], [pod(tj, phase="Failed", state=terminated(5))], now=100)
    assert cond(status, ConditionType.FAILED) == ("True", Reason.DEADLINE_EXCEEDED)
    assert "StorageUnavailable" in status.message


# Every DisruptionTarget reason Kubernetes sets (the Eviction API, the scheduler's preemption, the
# taint manager's NoExecute, the kubelet's node-pressure eviction and shutdown, the pod GC of a
# vanished node): none is the trainer's fault, so none may count as an attempt (promise 3).
@pytest.mark.parametrize(("kube_reason", "ours"), [("EvictionByEvictionAPI", Reason.EVICTED),
                                                   ("PreemptionByScheduler", Reason.PREEMPTED),
                                                   ("DeletionByTaintManager", Reason.EVICTED),
                                                   ("TerminationByKubelet", Reason.EVICTED),
                                                   ("DeletionByPodGC", Reason.EVICTED)])
def test_a_disrupted_pod_is_shown_while_the_job_replaces_it(kube_reason, ours):
    job = qlorajob()
    tj = trainer_job(job)
    p = pod(tj, phase="Running", state=running(), conditions=[disruption(kube_reason)], deleting=True)
    status, events = derive(job, [tj], [p])
    assert cond(status, ConditionType.RUNNING) == ("False", ours)
    assert "does not count as an attempt" in status.message
    assert any(e.reason == ours and e.type == "Warning" for e in events)
    assert status.attempts == 1


def test_the_replacement_pod_brings_the_job_back_to_running():
    job = qlorajob()
    tj = trainer_job(job)
    evicted = pod(tj, "aaaaa", phase="Failed", state=terminated(7), conditions=[disruption()])
    pending = pod(tj, "bbbbb", created=30, node=None)
    status, _ = derive(job, [tj], [evicted, pending])
    assert cond(status, ConditionType.RUNNING) == ("False", Reason.EVICTED)
    replacement = pod(tj, "bbbbb", created=30, phase="Running", state=running(31))
    status, _ = derive(with_status(job, status), [tj], [evicted, replacement])
    assert cond(status, ConditionType.RUNNING) == ("True", Reason.TRAINING)


def test_suspend_and_resume():
    job = qlorajob(spec={"suspend": True})
    tj = trainer_job(job)
    tj["spec"]["suspend"] = True
    status, events = derive(job, [tj], [])
    assert status.phase == "Suspended"
    assert cond(status, ConditionType.SUSPENDED) == ("True", Reason.SUSPENDED)
    assert [e.reason for e in events if e.reason == Reason.SUSPENDED] == [Reason.SUSPENDED]

    resumed = with_status(qlorajob(generation=2), status)
    tj["spec"]["suspend"] = False
    status2, events2 = derive(resumed, [tj], [pod(tj, created=200, phase="Running", state=running(201))], now=210)
    assert cond(status2, ConditionType.SUSPENDED) == ("False", Reason.RESUMED)
    assert status2.phase == "Running"
    assert status2.start_time.minute == 3  # the deadline clock starts again at the resume
    assert Reason.RESUMED in [e.reason for e in events2]


def test_a_terminal_status_is_final_even_when_the_job_is_gone():
    job = qlorajob()
    tj = trainer_job(job, finished="Complete")
    done, _ = derive(job, [tj], [pod(tj, phase="Succeeded", state=terminated(0, result_message()))])
    after_ttl, events = derive(with_status(job, done), [], [], now=5000)
    assert after_ttl == done
    assert events == []


def test_a_vanished_job_counts_as_a_lost_attempt_and_attempts_never_go_down():
    job = qlorajob()
    tj = trainer_job(job)
    first, _ = derive(job, [tj], [pod(tj, phase="Running", state=running())])
    status, _ = derive(with_status(job, first), [], [])
    assert status.attempts == 1
    assert cond(status, ConditionType.RUNNING) == ("False", Reason.POD_LOST)
    assert "attempt 2" in status.message


def test_last_transition_time_moves_only_with_the_status():
    job = qlorajob()
    tj = trainer_job(job)
    p = pod(tj, node=None, conditions=[unschedulable("0/1 nodes are available: 1 Insufficient nvidia.com/gpu.")])
    first, _ = derive(job, [tj], [p], now=100)
    p2 = pod(tj, node=None, conditions=[unschedulable("0/2 nodes are available: 2 Insufficient nvidia.com/gpu.")])
    second, events = derive(with_status(job, first), [tj], [p2], now=200)
    before, after = find(first, ConditionType.SCHEDULED), find(second, ConditionType.SCHEDULED)
    assert after.message.startswith("0/2") and after.last_transition_time == before.last_transition_time
    assert events == []  # a new message is not a transition


def test_the_same_observation_twice_changes_nothing_and_says_nothing():
    job = qlorajob()
    tj = trainer_job(job)
    observed = observe(job, [tj], [pod(tj, phase="Running", state=running())])
    first, events = derive_status(job, observed, NO_DELAY)
    again, events_again = derive_status(with_status(job, first), observed, NO_DELAY)
    assert events and again == first and events_again == []


def test_a_spec_the_models_refuse_fails_the_job():
    body_spec = {"lora": {"targetModules": ["all-linear", "q_proj"]}}
    job = qlorajob(spec=body_spec)
    status, _ = derive(job)
    assert status.phase == "Failed"
    assert cond(status, ConditionType.ACCEPTED) == ("False", Reason.INVALID_SPEC)
    assert "all-linear" in status.message


def test_progress_numbers_keep_a_few_significant_digits_for_kubectl_get():
    """The Loss printer column prints status.progress.loss as stored: 17 digits before this."""
    job = qlorajob()
    tj = trainer_job(job)
    progress = TrainingProgress(step=7, total_steps=40, loss=0.41234567890123456, eval_loss=1.0000000000000002,
                                learning_rate=0.00019876543, tokens_per_second=1234.5678)
    status, _ = derive(job, [tj], [pod(tj, phase="Running", state=running())], progress=progress)
    assert (status.progress.loss, status.progress.eval_loss) == (0.4123, 1.0)
    assert status.progress.learning_rate == 0.000199 and status.progress.tokens_per_second == 1235.0
    assert status.progress.summary == "7/40 (17%)"


def test_the_result_names_base_and_rank_for_servers_even_from_an_older_trainer():
    job = qlorajob(spec={"model": {"uri": "hf://Qwen/Qwen2.5-0.5B", "revision": "v1"}, "lora": {"r": 8}})
    tj = trainer_job(job, finished="Complete", finished_at=60)
    p = pod(tj, phase="Succeeded", state=terminated(0, result_message("s3://adapters/x/run/")))
    result = derive(job, [tj], [p])[0].result
    assert (result.base_model, result.base_model_revision, result.lora_rank, result.lora_alpha) == (
        "Qwen/Qwen2.5-0.5B", "v1", 8, 32)
    said = TrainerResultMessage(result=TrainingResult(adapter_uri="s3://adapters/x/run/", base_model="Qwen/Qwen2.5-0.5B",
                                                      base_model_revision="0123abcd", lora_rank=8, lora_alpha=16,
                                                      manifest_uri="s3://adapters/x/run/manifest.json",
                                                      manifest_sha256="cd" * 32))
    p = pod(tj, phase="Succeeded", state=terminated(0, said.model_dump_json(by_alias=True, exclude_none=True)))
    result = derive(job, [tj], [p])[0].result
    assert (result.base_model_revision, result.lora_alpha) == ("0123abcd", 16)  # the trainer's own word wins
