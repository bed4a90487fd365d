"""Data parallel in the operator, with no server: what a several-GPU or several-worker QLoRAJob renders
(torchrun arguments, an Indexed Job, a headless Service) and the status its group of pods derives
(gang wait, world size, each worker's state, the result from rank 0, the failure that came first)."""

from qlora_api import ConditionType, ExitCode, Reason
from qlora_operator.conditions import find
from qlora_operator.derivation import derive_status
from qlora_operator.observation import pod_to_tail
from qlora_operator.planning import Create, plan_actions
from qlora_operator.rendering import render_rendezvous_service, render_trainer_job
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
)

NO_DELAY = OperatorSettings(retry_delay=0)


def group_job(workers=2, gpus=1):
    return qlorajob(spec={"resources": {"workers": workers, "gpu": {"count": gpus}}})


def indexed_pod(tj, index, **kw):
    p = pod(tj, suffix=f"{index}-x", **kw)
    p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] = str(index)
    p["spec"]["hostname"] = f"{tj['metadata']['name']}-{index}"
    return p


def test_one_pod_with_several_gpus_runs_torchrun_standalone_in_a_plain_job():
    job = render_trainer_job(qlorajob(spec={"resources": {"gpu": {"count": 4}}}), 1, default_image="t:1",
                             active_deadline_seconds=None)
    args = job["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--nproc-per-node=4" in args and not any(a.startswith("--nnodes") for a in args)
    assert "completionMode" not in job["spec"]
    assert render_rendezvous_service(qlorajob(spec={"resources": {"gpu": {"count": 4}}}), 1) is None


def test_one_gpu_renders_exactly_as_before():
    job = render_trainer_job(qlorajob(), 1, default_image="t:1", active_deadline_seconds=None)
    assert job["spec"]["template"]["spec"]["containers"][0]["args"] == [
        "--config", "/etc/qlora/config.json", "--termination-log", "/dev/termination-log"]
    assert "subdomain" not in job["spec"]["template"]["spec"]


def test_several_workers_render_an_indexed_job_with_a_headless_service_for_the_rendezvous():
    qj = group_job(workers=3, gpus=2)
    job = render_trainer_job(qj, 2, default_image="t:1", active_deadline_seconds=None)
    spec = job["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"], spec["backoffLimit"]) == (
        "Indexed", 3, 3, 0)
    # one lost pod fails the attempt: no rule lets the Job replace a member of a running group
    assert all(rule["action"] == "FailJob" for rule in spec["podFailurePolicy"]["rules"])
    pod_spec = spec["template"]["spec"]
    assert pod_spec["subdomain"] == "demo-2"
    args = pod_spec["containers"][0]["args"]
    assert {"--nproc-per-node=2", "--nnodes=3", "--master-addr=demo-2-0.demo-2", "--master-port=29500"} <= set(args)
    assert pod_spec["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "2"  # per pod
    service = render_rendezvous_service(qj, 2)
    assert service["metadata"]["name"] == "demo-2" and service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True
    labels = spec["template"]["metadata"]["labels"]
    assert all(labels[k] == v for k, v in service["spec"]["selector"].items())  # it selects this attempt's pods
    assert service["metadata"]["ownerReferences"][0]["uid"] == qj.uid


def test_a_new_attempt_creates_the_service_before_the_job():
    qj = group_job()
    status, _ = derive_status(qj, observe(qj), NO_DELAY)
    actions = plan_actions(qj, observe(qj), status, NO_DELAY)
    assert [a.kind for a in actions if isinstance(a, Create)] == ["ConfigMap", "Service", "Job"]


def test_a_group_waits_pending_until_every_worker_has_a_node():
    qj = group_job(workers=2)
    tj = trainer_job(qj)
    said = "0/2 nodes are available: 2 Insufficient nvidia.com/gpu."
    pods = [indexed_pod(tj, 0, phase="Running", state=running()),
            indexed_pod(tj, 1, node=None, conditions=[unschedulable(said)])]
    status, _ = derive_status(qj, observe(qj, [tj], pods), NO_DELAY)
    assert status.phase == "Pending" and status.world_size == 2
    running_cond = find(status, ConditionType.RUNNING)
    assert (running_cond.status, running_cond.reason) == ("False", Reason.UNSCHEDULABLE)
    assert "1 of 2 workers have a node" in running_cond.message and said in running_cond.message
    assert find(status, ConditionType.SCHEDULED).status == "False"
    assert [(w.index, w.state, w.node) for w in status.workers] == [(0, "Running", "gpu-node-0"), (1, "Pending", None)]


def test_a_group_runs_when_all_workers_run_and_progress_comes_from_index_0():
    qj = group_job(workers=2, gpus=4)
    tj = trainer_job(qj)
    pods = [indexed_pod(tj, 1, phase="Running", state=running(), created=3),
            indexed_pod(tj, 0, phase="Running", state=running(), created=2)]
    observed = observe(qj, [tj], pods)
    assert pod_to_tail(observed)["metadata"]["name"] == "demo-1-0-x"  # rank 0 prints progress, not the newest pod
    status, _ = derive_status(qj, observed, NO_DELAY)
    assert status.phase == "Running" and status.world_size == 8
    assert "training on 2 workers" in status.message
    assert [w.state for w in status.workers] == ["Running", "Running"]


def test_the_groups_result_is_rank_0s():
    qj = group_job(workers=2)
    tj = trainer_job(qj, finished="Complete")
    pods = [indexed_pod(tj, 0, phase="Succeeded", state=terminated(0, result_message()), created=2),
            indexed_pod(tj, 1, phase="Succeeded", state=terminated(0, '{"event": "rank-done"}'), created=3)]
    status, _ = derive_status(qj, observe(qj, [tj], pods), NO_DELAY)
    assert status.phase == "Succeeded" and status.result.adapter_uri.startswith("s3://adapters/")


def test_a_group_whose_rank_0_pod_is_gone_reads_its_result_back_not_fails():
    """Rank 0 alone reports the result; its pod deleted as it exited (the others still there, exit
    0 with nothing to say) loses only the message: the next attempt reads the adapter back."""
    qj = group_job(workers=2)
    tj = trainer_job(qj, finished="Complete")
    pods = [indexed_pod(tj, 1, phase="Succeeded", state=terminated(0, '{"event": "rank-done"}'), created=3)]
    status, _ = derive_status(qj, observe(qj, [tj], pods), NO_DELAY)
    assert status.phase == "Pending", status.message
    assert find(status, ConditionType.RUNNING).reason == Reason.RESULT_MISSING
    assert "reads the published adapter back" in status.message


def test_a_failed_group_reports_the_worker_that_failed_first_and_retries():
    qj = group_job(workers=2)
    tj = trainer_job(qj, finished="Failed")
    lost = error_message("Unexpected", "RuntimeError: Connection closed by peer", ExitCode.UNEXPECTED)
    cause = error_message("StorageUnavailable", "S3 refused the checkpoint upload", ExitCode.STORAGE_UNAVAILABLE)
    pods = [indexed_pod(tj, 0, phase="Failed", state=terminated(1, lost, finished=45)),
            indexed_pod(tj, 1, phase="Failed", state=terminated(5, cause, finished=40))]
    status, _ = derive_status(qj, observe(qj, [tj], pods), NO_DELAY)
    running_cond = find(status, ConditionType.RUNNING)
    assert running_cond.reason == "StorageUnavailable" and "attempt 2" in running_cond.message
    assert status.phase == "Pending"  # retryable: the next attempt resumes the whole group
