"""Promise 4: never two trainers at once for one QLoRAJob, also across an operator restart.

Within an attempt the Job controller replaces a pod only once it has failed (podFailurePolicy
implies podReplacementPolicy Failed). Across attempts the operator starts attempt n+1 only when no
pod of the QLoRAJob's name is still running, including pods whose Job is gone (deleted by hand,
or with --cascade=orphan), which the garbage collector may not have stopped yet.
"""

import json
import time

import pytest
from qlora_api import ExitCode, QLoRAJobStatus
from qlora_localcluster.testing import kubectl
from qlora_operator import timestamps
from qlora_operator.planning import Create, plan_actions
from qlora_operator.settings import OperatorSettings
from support.objects import observe, pod, qlorajob, running, terminated, trainer_job, with_status
from support.operator_process import OperatorProcess, install_crd_and_rbac, service_account_kubeconfig
from support.shared_gpu import wait_for_the_gpu

NO_DELAY = OperatorSettings(retry_delay=0)
LABEL = "training.qlora-operator.dev/qlorajob"


def planned_jobs(job, jobs, pods):
    from qlora_operator.derivation import derive_status

    observed = observe(job, jobs, pods)
    status, _ = derive_status(job, observed, NO_DELAY)
    return [a.name for a in plan_actions(job, observed, status, NO_DELAY) if isinstance(a, Create) and a.kind == "Job"]


def test_the_next_attempt_waits_for_the_pod_of_a_deleted_job():
    job = qlorajob(spec={"backoffLimit": 2})
    gone = trainer_job(job)  # attempt 1's Job was deleted: only its pod is left, still running
    orphan = pod(gone, phase="Running", state=running())
    orphan["metadata"]["ownerReferences"] = []
    status_job = with_status(job, QLoRAJobStatus(attempts=1))  # the status says attempt 1 was created
    assert planned_jobs(status_job, [], [orphan]) == []
    stopped = pod(gone, phase="Failed", state=terminated(137))
    stopped["metadata"]["ownerReferences"] = []
    assert planned_jobs(status_job, [], [stopped]) == ["demo-2"]


def test_the_next_attempt_waits_while_a_failed_jobs_pod_still_stops():
    job = qlorajob(spec={"backoffLimit": 2})
    failed = trainer_job(job, finished="Failed")
    stopping = pod(failed, phase="Running", state=running(), deleting=True)
    assert planned_jobs(job, [failed], [stopping]) == []
    done = pod(failed, phase="Failed", state=terminated(int(ExitCode.STORAGE_UNAVAILABLE)))
    assert planned_jobs(job, [failed], [done]) == ["demo-2"]


@pytest.mark.cluster
def test_an_orphaned_trainer_finishes_before_the_next_attempt_starts_across_an_operator_restart(
        local_cluster, namespace, tmp_path):
    wait_for_the_gpu(local_cluster)
    install_crd_and_rbac(local_cluster)
    kubeconfig = service_account_kubeconfig(local_cluster, tmp_path / "operator.kubeconfig")
    operator = OperatorProcess(kubeconfig, namespace, tmp_path / "operator.log").start()
    manifest = {"apiVersion": "training.qlora-operator.dev/v1alpha1", "kind": "QLoRAJob",
                "metadata": {"name": "solo", "namespace": namespace},
                "spec": {"model": {"uri": "hf://fake/succeed"}, "dataset": {"uri": "s3://datasets/x.jsonl"},
                         "output": {"bucket": "adapters"}, "training": {"maxSteps": 30}, "backoffLimit": 2,
                         "resources": {"image": "qlora-fake-trainer:test"}}}
    try:
        kubectl(local_cluster, "apply", "-f", "-", input=json.dumps(manifest))
        deadline = time.monotonic() + 120
        while "step" not in json.dumps(get(local_cluster, namespace).get("progress") or {}):
            assert time.monotonic() < deadline, operator.log_tail()
            time.sleep(0.3)
        operator.kill9()
        # Attempt 1's Job goes away while its pod keeps training (orphaned, as after a careless delete).
        kubectl(local_cluster, "-n", namespace, "delete", "job", "solo-1", "--cascade=orphan")
        operator.start()
        deadline = time.monotonic() + 180
        while get(local_cluster, namespace).get("phase") != "Succeeded":
            assert time.monotonic() < deadline, operator.log_tail()
            time.sleep(0.5)
        status = get(local_cluster, namespace)
        assert status["attempts"] == 2
        pods = json.loads(kubectl(local_cluster, "-n", namespace, "get", "pods", "-l", f"{LABEL}=solo", "-o",
                                  "json").stdout)["items"]
        runs = sorted(_container_run(p) for p in pods)
        assert len(runs) == 2, runs
        (first_start, first_end), (second_start, _) = runs
        assert second_start >= first_end, f"attempt 2 started at {second_start}, attempt 1 ran until {first_end}"
    finally:
        kubectl(local_cluster, "-n", namespace, "delete", "qlorajobs", "--all", "--wait=false", check=False)
        kubectl(local_cluster, "-n", namespace, "delete", "pods", "-l", f"{LABEL}=solo", "--wait=false", check=False)
        operator.stop()


def get(cluster, namespace) -> dict:
    out = kubectl(cluster, "-n", namespace, "get", "qlorajob", "solo", "-o", "json").stdout
    return json.loads(out).get("status") or {}


def _container_run(pod: dict):
    state = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    return timestamps.parse(state["startedAt"]), timestamps.parse(state["finishedAt"])
