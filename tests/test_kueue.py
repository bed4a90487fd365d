"""QLoRAJobs queued by Kueue on the local cluster: Kueue built from its Go module and running as
its own ServiceAccount (localcluster/qlora_localcluster/kueue.py), a ClusterQueue with quota for
one GPU, and the operator as in test_operator_integration.py (its own ServiceAccount, the chart's
RBAC, the scripted trainer).

    .venv/bin/pytest tests/test_kueue.py        # ~1 minute once the cluster and Kueue are up

Kueue's quota is not the node's capacity: the tests wait for the shared GPU first (as every test
that runs trainer pods does), so the pods they start are the only ones on it.
"""

import json
import os

import pytest
import yaml
from qlora_localcluster import kueue, operator_install
from qlora_localcluster.testing import kubectl
from support.operator_process import OperatorProcess
from support.shared_gpu import wait_for_the_gpu
from test_operator_integration import Env

pytestmark = pytest.mark.cluster
QUEUE = "gpu"
RELEASE = "qlora-kueue-test"
QUOTA_MESSAGE = "insufficient unused quota for nvidia.com/gpu"


@pytest.fixture(scope="session")
def kueue_running(local_cluster):
    started = kueue.ensure_running(local_cluster)
    yield
    if started and os.environ.get("QLORA_KEEP_CLUSTER") != "1":
        kueue.stop(local_cluster)


@pytest.fixture(scope="module")
def operator_kubeconfig(local_cluster, tmp_path_factory):
    """The chart's RBAC under a release name of its own: other sessions on the shared cluster
    re-apply the default release's ClusterRole from their own trees, which may lack the Workload rule."""
    operator_install.apply_chart(local_cluster, release=RELEASE)
    return operator_install.service_account_kubeconfig(
        local_cluster, tmp_path_factory.mktemp("operator") / "kubeconfig", release=RELEASE)


class QueueEnv(Env):
    """Env with a LocalQueue of its own, backed by a ClusterQueue that holds one GPU."""

    def queued_manifest(self, name, priority_class=None, **kwargs) -> str:
        obj = yaml.safe_load(self.manifest(name, **kwargs))
        obj["metadata"]["labels"] = {"kueue.x-k8s.io/queue-name": QUEUE}
        if priority_class:
            obj["spec"]["resources"]["priorityClassName"] = priority_class
        return yaml.safe_dump(obj)

    def apply_queued(self, name, **kwargs):
        return self.kubectl("apply", "-f", "-", input=self.queued_manifest(name, **kwargs))

    def job(self, name) -> dict:
        return json.loads(self.kubectl("get", "job", name, "-o", "json").stdout)

    def workload_of(self, job_name) -> dict | None:
        uid = self.job(job_name)["metadata"]["uid"]
        items = json.loads(self.kubectl("get", "workloads.kueue.x-k8s.io", "-l", f"kueue.x-k8s.io/job-uid={uid}",
                                        "-o", "json").stdout)["items"]
        return items[0] if items else None


@pytest.fixture
def queue_env(local_cluster, kueue_running, namespace, operator_kubeconfig, tmp_path):
    wait_for_the_gpu(local_cluster)
    cluster_scoped = _cluster_queue(local_cluster, namespace)
    kubectl(local_cluster, "-n", namespace, "create", "secret", "generic", "s3",
            "--from-literal=AWS_ACCESS_KEY_ID=test", "--from-literal=AWS_SECRET_ACCESS_KEY=test-secret")
    operator = OperatorProcess(operator_kubeconfig, namespace, tmp_path / "operator.log").start()
    env = QueueEnv(local_cluster, namespace, operator)
    yield env
    env.kubectl("delete", "qlorajobs", "--all", "--wait=false", check=False)
    env.wait_for("trainer pods gone", lambda: not env.kubectl(
        "get", "pods", "-l", "training.qlora-operator.dev/qlorajob", "-o", "name").stdout.strip(), timeout=60)
    operator.stop()
    # Waited for: Kueue removes its finalizers from these, and the session may stop Kueue next.
    env.kubectl("delete", "localqueue", QUEUE, "--timeout=30s", check=False)
    kubectl(local_cluster, "delete", *cluster_scoped, "--timeout=30s", check=False)


def operator_errors(env) -> list[str]:
    """Refused requests and crashes of the operator (errors_in_log leaves out the Node authorizer's
    lag that the operator only quotes)."""
    return env.operator.errors_in_log()


def _cluster_queue(cluster, namespace) -> list[str]:
    """A ResourceFlavor, a ClusterQueue for this namespace only (1 GPU, lower priorities preemptible)
    and PriorityClasses with preemptionPolicy Never: Kueue reads their values for its workload
    priority, and kube-scheduler never preempts another test's pod for them."""
    name = f"qlora-{namespace}"
    objs = [
        {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "ResourceFlavor", "metadata": {"name": name}},
        {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "ClusterQueue", "metadata": {"name": name}, "spec": {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
            "preemption": {"withinClusterQueue": "LowerPriority"},
            "resourceGroups": [{"coveredResources": ["nvidia.com/gpu"], "flavors": [
                {"name": name, "resources": [{"name": "nvidia.com/gpu", "nominalQuota": 1}]}]}]}},
        {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "LocalQueue",
         "metadata": {"name": QUEUE, "namespace": namespace}, "spec": {"clusterQueue": name}},
    ] + [{"apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass", "metadata": {"name": f"{name}-{level}"},
          "value": value, "preemptionPolicy": "Never"} for level, value in (("low", 10), ("high", 1000))]
    kubectl(cluster, "apply", "-f", "-", input="\n---\n".join(json.dumps(o) for o in objs))
    kubectl(cluster, "wait", "--for=condition=Active", f"clusterqueue/{name}", "--timeout=30s")
    return [f"clusterqueue/{name}", f"resourceflavor/{name}", f"priorityclass/{name}-low",
            f"priorityclass/{name}-high"]


def test_the_second_job_waits_in_the_queue_with_kueues_message_then_runs(queue_env):
    env = queue_env
    env.apply_queued("first", steps=25)
    env.wait_condition("first", "Running", timeout=60)
    env.apply_queued("second", steps=5)

    queued = env.wait_condition("second", "Running", "False", "Queued", timeout=30)
    assert "LocalQueue gpu" in queued["message"]
    env.wait_for("Kueue's own words in the status", lambda: QUOTA_MESSAGE in env.condition(
        "second", "Running").get("message", ""), timeout=30)
    status = env.status("second")
    assert status["phase"] == "Pending" and status["attempts"] == 1
    assert not env.condition("second", "Suspended")  # Kueue's hold is not the user's suspend
    held = env.job("second-1")
    assert held["spec"]["suspend"] is True and held["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == QUEUE
    assert env.children("pods", "second") == []
    assert env.status("first")["phase"] == "Running"
    assert any(QUOTA_MESSAGE in e["message"] for e in env.events("second") if e["reason"] == "Queued")

    env.wait_condition("first", "Succeeded", timeout=60)
    env.wait_condition("second", "Succeeded", timeout=60)
    first, second = env.status("first"), env.status("second")
    assert first["attempts"] == 1 and second["attempts"] == 1
    pods = json.loads(env.kubectl("get", "pods", "-l", "training.qlora-operator.dev/qlorajob=second",
                                  "-o", "json").stdout)["items"]
    finished_first = env.job("first-1")["status"]["completionTime"]
    assert pods and all(p["metadata"]["creationTimestamp"] >= finished_first for p in pods)  # admitted after
    assert env.workload_of("second-1")["status"]["admission"]["clusterQueue"] == f"qlora-{env.ns}"
    assert operator_errors(env) == []


def test_a_preempted_job_resumes_from_its_checkpoint_without_burning_a_retry(queue_env):
    env = queue_env
    low, high = f"qlora-{env.ns}-low", f"qlora-{env.ns}-high"
    env.apply_queued("low", steps=60, priority_class=low, backoffLimit=0)
    env.wait_progress("low", 3, timeout=60)
    env.apply_queued("high", steps=5, priority_class=high)

    # spec.resources.priorityClassName is the priority Kueue gives the workload.
    workload = env.wait_for("the Workload of high-1", lambda: env.kubectl(
        "get", "job", "high-1", check=False).returncode == 0 and env.workload_of("high-1"), timeout=30)
    assert workload["spec"]["priority"] == 1000
    assert workload["spec"]["priorityClassRef"]["name"] == high

    env.wait_for("low evicted by Kueue", lambda: next(
        (e for e in env.events("low") if e["reason"] in ("Preempted", "Queued")), None), timeout=30)
    evicted = env.workload_of("low-1")["status"]["conditions"]
    assert any(c["type"] == "Evicted" and c["reason"] == "Preempted" for c in evicted), evicted
    env.wait_condition("high", "Succeeded", timeout=60)
    env.wait_condition("low", "Succeeded", timeout=90)

    status = env.status("low")
    assert status["attempts"] == 1 and env.children("jobs", "low") == ["low-1"]  # no retry burnt
    assert status["result"]["resumedFromStep"] >= 3  # the same run, from its checkpoint
    assert not env.condition("low", "Failed")
    assert operator_errors(env) == []


def test_suspending_a_queued_job_deactivates_its_workload_and_resuming_requeues_it(queue_env):
    env = queue_env
    env.apply_queued("pause", steps=40)
    env.wait_progress("pause", 3, timeout=60)
    env.kubectl("patch", "qlorajob", "pause", "--type=merge", "-p", '{"spec":{"suspend":true}}')
    env.wait_condition("pause", "Suspended", "True", "Suspended", timeout=30)
    env.wait_for("pods gone", lambda: not env.children("pods", "pause"), timeout=30)
    assert env.workload_of("pause-1")["spec"]["active"] is False  # Kueue's way to hold a workload
    assert env.job("pause-1")["spec"]["suspend"] is True

    env.kubectl("patch", "qlorajob", "pause", "--type=merge", "-p", '{"spec":{"suspend":false}}')
    env.wait_condition("pause", "Succeeded", timeout=90)
    status = env.status("pause")
    assert status["attempts"] == 1 and status["result"]["resumedFromStep"] >= 3
    assert env.workload_of("pause-1")["spec"]["active"] is True
    assert operator_errors(env) == []
