"""The operator against the real local cluster: kube-apiserver with RBAC, the real Job controller,
scheduler and garbage collector, a node agent running pods as processes, and a scripted trainer
(tests/support/fake_trainer.py) that finishes in seconds.

The operator runs as a subprocess authenticated as its own ServiceAccount, bound to the ClusterRole
that the Helm chart renders, with a 1 s resync. Everything a user does goes through kubectl.

    .venv/bin/pytest tests/test_operator_integration.py      # ~2-3 minutes once the cluster is up
"""

import json
import time

import pytest
from qlora_localcluster.testing import kubectl
from qlora_operator.rendering import render_config_map, render_trainer_job
from support.objects import FULL_RESOURCES, qlorajob
from support.operator_process import (
    OperatorProcess,
    fake_trainer_qlorajob,
    install_crd_and_rbac,
    service_account_kubeconfig,
)
from support.shared_gpu import wait_for_the_gpu

pytestmark = pytest.mark.cluster
LABEL = "training.qlora-operator.dev/qlorajob"


@pytest.fixture(scope="module")
def operator_kubeconfig(local_cluster, tmp_path_factory):
    install_crd_and_rbac(local_cluster)
    return service_account_kubeconfig(local_cluster, tmp_path_factory.mktemp("operator") / "kubeconfig")


class Env:
    """One namespace, one operator watching it, and what a user would type."""

    def __init__(self, cluster, namespace, operator):
        self.cluster, self.ns, self.operator = cluster, namespace, operator

    def kubectl(self, *args, check=True, input=None):
        return kubectl(self.cluster, "-n", self.ns, *args, check=check, input=input)

    def manifest(self, name, scenario="succeed", steps=10, **spec):
        return fake_trainer_qlorajob(name, self.ns, scenario, steps, **spec)

    def apply(self, name, **kwargs):
        return self.kubectl("apply", "-f", "-", input=self.manifest(name, **kwargs))

    def get(self, name) -> dict:
        return json.loads(self.kubectl("get", "qlorajob", name, "-o", "json").stdout)

    def status(self, name) -> dict:
        return self.get(name).get("status") or {}

    def condition(self, name, ctype) -> dict:
        return next((c for c in self.status(name).get("conditions", []) if c["type"] == ctype), {})

    def wait_for(self, what, check, timeout=60.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = check()
            if value:
                return value
            time.sleep(0.3)
        raise AssertionError(f"no {what} after {timeout} s; operator log:\n{self.operator.log_tail()}")

    def wait_condition(self, name, ctype, status="True", reason=None, timeout=60.0) -> dict:
        def met():
            c = self.condition(name, ctype)
            return c if c.get("status") == status and (reason is None or c.get("reason") == reason) else None
        return self.wait_for(f"{ctype}={status} ({reason}) on {name}", met, timeout)

    def wait_progress(self, name, step, timeout=60.0) -> dict:
        return self.wait_for(f"progress step {step} on {name}",
                             lambda: (self.status(name).get("progress") or {}).get("step", 0) >= step and
                             self.status(name), timeout)

    def children(self, kind, name) -> list[str]:
        items = json.loads(self.kubectl("get", kind, "-l", f"{LABEL}={name}", "-o", "json").stdout)["items"]
        return sorted(i["metadata"]["name"] for i in items)

    def events(self, name) -> list[dict]:
        out = self.kubectl("get", "events", "--field-selector",
                           f"involvedObject.kind=QLoRAJob,involvedObject.name={name}", "-o", "json").stdout
        return json.loads(out)["items"]

    def wait_event(self, name, reason, timeout=60.0) -> dict:
        return self.wait_for(f"event {reason} on {name}",
                             lambda: next((e for e in self.events(name) if e["reason"] == reason), None), timeout)

    def running_pod(self, name) -> str:
        def find():
            pods = json.loads(self.kubectl("get", "pods", "-l", f"{LABEL}={name}", "-o", "json").stdout)["items"]
            return next((p["metadata"]["name"] for p in pods if p["status"].get("phase") == "Running"
                         and not p["metadata"].get("deletionTimestamp")), None)
        return self.wait_for(f"running pod of {name}", find)


@pytest.fixture
def env(local_cluster, namespace, operator_kubeconfig, tmp_path):
    wait_for_the_gpu(local_cluster)
    kubectl(local_cluster, "-n", namespace, "create", "secret", "generic", "s3",
            "--from-literal=AWS_ACCESS_KEY_ID=test", "--from-literal=AWS_SECRET_ACCESS_KEY=test-secret")
    operator = OperatorProcess(operator_kubeconfig, namespace, tmp_path / "operator.log").start()
    environment = Env(local_cluster, namespace, operator)
    yield environment
    # QLoRAJobs carry no finalizer: deleting them is immediate, the garbage collector takes the rest.
    environment.kubectl("delete", "qlorajobs", "--all", "--wait=false", check=False)
    environment.wait_for("trainer pods gone", lambda: not environment.kubectl(
        "get", "pods", "-l", LABEL, "-o", "name").stdout.strip(), timeout=60)
    operator.stop()


def test_happy_path_with_kubectl_apply_wait_get_describe_and_logs(env):
    env.apply("happy")
    waited = env.kubectl("wait", "--for=condition=Succeeded", "qlorajob/happy", "--timeout=60s", check=False)
    assert waited.returncode == 0, waited.stderr + env.operator.log_tail()

    job = env.get("happy")
    status, uid = job["status"], job["metadata"]["uid"]
    assert status["phase"] == "Succeeded"
    assert status["attempts"] == 1 and status["jobName"] == "happy-1"
    assert status["result"]["adapterUri"] == f"s3://adapters/adapters/{env.ns}/happy/{uid}/"
    assert status["progress"]["step"] == 10 and status["progress"]["summary"] == "10/10 (100%)"
    assert status["startTime"] and status["completionTime"]
    assert all(c["observedGeneration"] == 1 for c in status["conditions"])

    table = env.kubectl("get", "qlorajob", "happy").stdout
    assert "Succeeded" in table and "10/10 (100%)" in table
    described = env.kubectl("describe", "qlorajob", "happy").stdout
    assert "JobCreated" in described and "adapter published to s3://adapters/" in described
    logs = env.kubectl("logs", "job/happy-1").stdout
    assert '"event":"progress"' in logs and "published" in logs

    trainer_job = json.loads(env.kubectl("get", "job", "happy-1", "-o", "json").stdout)
    assert trainer_job["metadata"]["ownerReferences"][0]["uid"] == uid
    pod_spec = trainer_job["spec"]["template"]["spec"]
    assert pod_spec["automountServiceAccountToken"] is False
    assert pod_spec["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    config = json.loads(json.loads(env.kubectl("get", "configmap", "happy-1-config", "-o", "json").stdout)
                        ["data"]["config.json"])
    assert config["runId"] == uid

    metrics = env.operator.metrics()
    assert 'qlora_operator_jobs{phase="Succeeded"} 1.0' in metrics
    assert "qlora_operator_time_to_running_seconds_count 1.0" in metrics
    assert env.operator.errors_in_log() == []  # RBAC allowed everything it needed


def test_unschedulable_carries_the_schedulers_message(env):
    env.apply("nogpu", resources={"gpu": {"count": 1, "product": "NVIDIA-B200-NOT-HERE"}})
    scheduled = env.wait_condition("nogpu", "Scheduled", "False", "Unschedulable")
    assert "nodes are available" in scheduled["message"]
    assert "node affinity/selector" in scheduled["message"]
    assert env.status("nogpu")["phase"] == "Pending"
    event = env.wait_event("nogpu", "Unschedulable")
    assert event["type"] == "Warning" and "nodes are available" in event["message"]


def test_an_image_that_cannot_be_pulled(env):
    env.apply("badimage", resources={"image": "registry.invalid/no-such-trainer:1"})
    running = env.wait_condition("badimage", "Running", "False", "ImagePullFailed")
    assert "no-such-trainer" in running["message"]
    assert env.status("badimage")["phase"] == "Pending"
    assert env.wait_event("badimage", "ImagePullFailed")["type"] == "Warning"


def test_oom_killed_fails_at_once(env):
    env.apply("hog", scenario="oom", resources={"memory": "200Mi"}, backoffLimit=2)
    failed = env.wait_condition("hog", "Failed", reason="OOMKilled")
    assert "200Mi" in failed["message"]
    status = env.status("hog")
    assert status["phase"] == "Failed" and status["attempts"] == 1
    assert env.children("jobs", "hog") == ["hog-1"]


def test_a_trainer_error_is_reported_in_its_own_words(env):
    env.apply("baddata", scenario="bad-data", backoffLimit=2)
    failed = env.wait_condition("baddata", "Failed", reason="BadData")
    assert "line 3: a record without 'messages'" in failed["message"]
    assert env.status("baddata")["attempts"] == 1  # permanent: no retry despite backoffLimit 2


def test_a_retryable_failure_runs_a_second_attempt_of_the_same_run(env):
    env.apply("flaky", scenario="flaky", backoffLimit=1)
    env.wait_condition("flaky", "Succeeded")
    status = env.status("flaky")
    assert status["attempts"] == 2 and status["jobName"] == "flaky-2"
    assert env.children("jobs", "flaky") == ["flaky-1", "flaky-2"]
    warning = env.wait_event("flaky", "StorageUnavailable")
    assert "attempt 2 of 2" in warning["message"] and "503" in warning["message"]
    configs = [json.loads(json.loads(env.kubectl("get", "configmap", f"flaky-{n}-config", "-o", "json").stdout)
                          ["data"]["config.json"]) for n in (1, 2)]
    assert [c["attempt"] for c in configs] == [1, 2]
    assert configs[0]["runId"] == configs[1]["runId"] == env.get("flaky")["metadata"]["uid"]


def test_a_deadline_shortened_while_running_stops_the_job(env):
    env.apply("late", steps=500, activeDeadlineSeconds=600)
    env.wait_progress("late", 1)
    env.kubectl("patch", "qlorajob", "late", "--type=merge", "-p", '{"spec":{"activeDeadlineSeconds":4}}')
    failed = env.wait_condition("late", "Failed", reason="DeadlineExceeded", timeout=40)
    assert "deadline" in failed["message"]
    trainer_job = json.loads(env.kubectl("get", "job", "late-1", "-o", "json").stdout)
    assert trainer_job["spec"]["activeDeadlineSeconds"] <= 4  # what was left of the QLoRAJob's deadline
    assert env.status("late")["attempts"] == 1


def test_ttl_deletes_the_finished_job_but_the_status_stays(env):
    env.apply("short", ttlSecondsAfterFinished=0)
    env.wait_condition("short", "Succeeded")
    env.wait_for("the TTL controller deleting short-1", lambda: not env.children("jobs", "short"), timeout=30)
    time.sleep(2)  # several resyncs without the Job
    status = env.status("short")
    assert status["phase"] == "Succeeded" and status["result"]["adapterUri"].startswith("s3://adapters/")
    assert env.children("jobs", "short") == []  # and no new attempt was started


def test_eviction_gets_a_replacement_pod_without_burning_an_attempt(env):
    env.apply("evicted", steps=40)
    env.wait_progress("evicted", 3)
    pod = env.running_pod("evicted")
    eviction = {"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": pod, "namespace": env.ns}}
    env.kubectl("create", "--raw", f"/api/v1/namespaces/{env.ns}/pods/{pod}/eviction", "-f", "-",
                input=json.dumps(eviction))
    event = env.wait_event("evicted", "Evicted")
    assert event["type"] == "Warning" and pod in event["message"]
    env.wait_condition("evicted", "Succeeded", timeout=90)
    status = env.status("evicted")
    assert status["attempts"] == 1
    assert env.children("jobs", "evicted") == ["evicted-1"]
    assert status["result"]["resumedFromStep"] >= 3  # the replacement resumed the same run


def test_an_operator_killed_mid_job_picks_up_where_it_was(env):
    env.apply("restart", steps=40)
    before = env.wait_progress("restart", 2)
    env.operator.kill9()
    time.sleep(2)
    env.operator.start()
    phases = []
    while (phase := env.status("restart").get("phase")) not in ("Succeeded", "Failed"):
        phases.append(phase)
        assert len(phases) < 400, env.operator.log_tail()
        time.sleep(0.15)
    after = env.status("restart")
    assert phase == "Succeeded" and "Pending" not in phases  # never rewound
    assert after["attempts"] == 1 and env.children("jobs", "restart") == ["restart-1"]
    assert after["startTime"] == before["startTime"]
    for ctype in ("Accepted", "Scheduled"):
        assert env.condition("restart", ctype)["lastTransitionTime"] == next(
            c for c in before["conditions"] if c["type"] == ctype)["lastTransitionTime"]
    assert [e["reason"] for e in env.events("restart")].count("JobCreated") == 1


def test_deleting_a_qlorajob_removes_its_children_through_the_garbage_collector(env):
    env.apply("gone", steps=200)
    env.running_pod("gone")
    assert env.children("jobs", "gone") == ["gone-1"] and env.children("configmaps", "gone") == ["gone-1-config"]
    env.kubectl("delete", "qlorajob", "gone", "--timeout=30s")
    env.wait_for("children collected", lambda: not any(
        env.children(kind, "gone") for kind in ("jobs", "configmaps", "pods")), timeout=60)


def test_a_qlorajob_can_be_deleted_while_no_operator_runs(env):
    env.apply("orphan")
    env.wait_condition("orphan", "Running")
    assert not env.get("orphan")["metadata"].get("finalizers"), "QLoRAJobs must carry no finalizer"
    env.operator.stop()
    deleted = env.kubectl("delete", "qlorajob", "orphan", "--timeout=20s", check=False)
    assert deleted.returncode == 0, deleted.stderr
    env.wait_for("trainer Job collected", lambda: not env.children("jobs", "orphan"), timeout=60)


def test_suspend_stops_the_pod_and_resume_continues_from_the_checkpoint(env):
    env.apply("pause", steps=50)
    env.wait_progress("pause", 3)
    env.kubectl("patch", "qlorajob", "pause", "--type=merge", "-p", '{"spec":{"suspend":true}}')
    env.wait_condition("pause", "Suspended", "True", "Suspended")
    env.wait_for("pods gone", lambda: not env.children("pods", "pause"))
    assert env.status("pause")["phase"] == "Suspended"
    trainer_job = json.loads(env.kubectl("get", "job", "pause-1", "-o", "json").stdout)
    assert trainer_job["spec"]["suspend"] is True

    env.kubectl("patch", "qlorajob", "pause", "--type=merge", "-p", '{"spec":{"suspend":false}}')
    env.wait_condition("pause", "Suspended", "False", "Resumed")
    env.wait_condition("pause", "Succeeded", timeout=90)
    status = env.status("pause")
    assert status["attempts"] == 1 and status["result"]["resumedFromStep"] >= 3


def test_a_trainer_job_using_every_resources_field_is_valid_for_the_api_server(env):
    job = qlorajob(namespace=env.ns, spec={"resources": {**FULL_RESOURCES, "tolerations": [
        {"key": "spot", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 30}]},
        "output": {"credentialsSecretRef": {"name": "s3", "sessionTokenKey": "token"}}})
    manifests = [render_config_map(job, 1), render_trainer_job(job, 1, default_image="x", active_deadline_seconds=60)]
    created = env.kubectl("create", "--dry-run=server", "-o", "name", "-f", "-",
                          input="\n---\n".join(json.dumps(m) for m in manifests), check=False)
    assert created.returncode == 0, created.stderr
    assert created.stdout.split() == ["configmap/demo-1-config", "job.batch/demo-1"]


def test_invalid_specs_are_refused_by_the_api_server_with_the_field_path(env):
    refused = env.kubectl("apply", "-f", "-", check=False, input=env.manifest("bad", lora={"r": 0}))
    assert refused.returncode != 0 and "spec.lora.r" in refused.stderr
    refused = env.kubectl("apply", "-f", "-", check=False,
                          input=env.manifest("bad", lora={"targetModules": ["all-linear", "q_proj"]}))
    assert refused.returncode != 0 and "all-linear cannot be combined" in refused.stderr
    assert env.kubectl("get", "qlorajobs", "-o", "name").stdout.strip() == ""


def test_spec_changes_are_refused_and_reapplying_the_same_yaml_changes_nothing(env):
    env.apply("steady", suspend=True)
    env.wait_condition("steady", "Suspended", "True")
    time.sleep(2)  # let the last write settle, then watch several resyncs go by
    version = env.get("steady")["metadata"]["resourceVersion"]
    reapplied = env.apply("steady", suspend=True)
    assert "unchanged" in reapplied.stdout
    time.sleep(4)
    assert env.get("steady")["metadata"]["resourceVersion"] == version  # no status churn

    refused = env.kubectl("patch", "qlorajob", "steady", "--type=merge", "-p", '{"spec":{"lora":{"r":8}}}',
                          check=False)
    assert refused.returncode != 0 and "immutable" in refused.stderr and "spec.lora" in refused.stderr
    env.kubectl("patch", "qlorajob", "steady", "--type=merge", "-p", '{"spec":{"backoffLimit":5}}')
    env.wait_for("observedGeneration 2", lambda: env.status("steady").get("observedGeneration") == 2, timeout=20)
