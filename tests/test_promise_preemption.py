"""Promise 3: preemption costs no retry and no progress beyond the checkpoint interval.

One QLoRAJob trains the tiny model with the real trainer on a private cluster with two GPU nodes,
and is disrupted three times, the way a platform disrupts it:

1. eviction through the Eviction API (`pods/eviction`, as the descheduler or a person does);
2. `kubectl drain` of the node the trainer runs on (cordon, then eviction), so the replacement
   has to run on the other node;
3. priority preemption: a pod of a higher PriorityClass asks for the trainer node's only GPU, and
   the real kube-scheduler picks the trainer (PriorityClass `qlora-batch`) as its victim.

After each: the attempt count stays 1 (the Job's podFailurePolicy ignores DisruptionTarget pods and
the operator counts nothing), the node agent stopped the old pod the way a kubelet does (SIGTERM
within the pod's grace period, the trainer checkpointed and exited INTERRUPTED), and the replacement
pod's first report says it resumed at exactly the newest complete checkpoint in S3, which is where
the old pod stopped: no step was lost, and never more than checkpointSteps could be. The status
shows it as `status.progress.resumedFromStep` and `checkpointStep`. Then the run finishes.

The three cases share one job (and one cluster) because a trainer start costs half a minute of
the CI machine's two cores; each case is its own test and names its own disruption when it fails.
Private cluster: drain and preemption need a second GPU node, and cordoning the shared cluster's
only node would stall every other test.
"""

import json
import re
import threading
import time

import pytest
from kubernetes import client, config, watch
from qlora_localcluster.testing import kubectl, private_cluster
from support.cluster_s3 import stage_tiny_run
from support.operator_process import OperatorProcess, install_crd_and_rbac, service_account_kubeconfig
from support.polling import qlorajob_status, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
TRAINER_IMAGE = "ghcr.io/qlora-operator/trainer:0.1.0"
NAMESPACE = "preempt"
JOB = "steady"
CHECKPOINT_STEPS = 3
# Enough steps that the third disruption lands while training even on an idle machine: at 30 a
# fast run reached its end and was publishing when the scheduler preempted it; at 48, once pods ran
# one OpenMP thread each (about 0.15 s a step), the third pod trained its last 21 steps in 3 s and
# finished first. (A trainer that publishes as it is preempted succeeds: the operator takes the
# result from the exiting pod, or reads it back in one more attempt when the pod is already gone;
# test_reconcile_derivation.py. This test is about disruptions that land in training.)
MAX_STEPS = 150
JOB_LABEL = "batch.kubernetes.io/job-name"
INTERRUPTED = 7  # qlora_api.ExitCode.INTERRUPTED: stopped by SIGTERM after checkpointing
GRACE_SECONDS = 120  # qlora_operator.rendering.TERMINATION_GRACE_SECONDS


class PodHistory:
    """Every version of every pod in the namespace, from a watch: the node agent deletes a stopped
    pod as soon as its final status is written, so polling would miss the exit code and the
    DisruptionTarget condition the test needs to see."""

    def __init__(self, kubeconfig):
        self.api = client.CoreV1Api(config.new_client_from_config(config_file=str(kubeconfig)))
        self.versions: dict[str, list[dict]] = {}
        self.deleted: set[str] = set()
        self._stopped = threading.Event()
        self._watch = watch.Watch()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stopped.is_set():  # the server ends a watch now and then: watch again
            try:
                for event in self._watch.stream(self.api.list_namespaced_pod, NAMESPACE):
                    pod = event["raw_object"]
                    name = pod["metadata"]["name"]
                    self.versions.setdefault(name, []).append(pod)
                    if event["type"] == "DELETED":
                        self.deleted.add(name)
            except Exception:  # a dropped connection (a repeated version does no harm)
                time.sleep(0.5)

    def stop(self):
        self._stopped.set()
        self._watch.stop()

    def trainer_pods(self) -> list[str]:
        """Names of the QLoRAJob's trainer pods, oldest first."""
        pods = [(v[0]["metadata"].get("creationTimestamp", ""), name) for name, v in list(self.versions.items())
                if v[0]["metadata"].get("labels", {}).get(JOB_LABEL, "").startswith(f"{JOB}-")]
        return [name for _, name in sorted(pods)]

    def last(self, name: str) -> dict:
        return self.versions[name][-1]

    def deletion_requested(self, name: str) -> dict | None:
        """The pod's first version with a deletionTimestamp: the graceful deletion as it was asked
        for (the node agent's own delete after the processes are gone has grace 0)."""
        return next((p for p in self.versions.get(name, []) if p["metadata"].get("deletionTimestamp")), None)

    def final(self, name: str) -> dict | None:
        """The pod's last version with its trainer container terminated (None if none was seen)."""
        for pod in reversed(self.versions.get(name, [])):
            for cs in pod.get("status", {}).get("containerStatuses") or []:
                if cs["name"] == "trainer" and (cs.get("state") or {}).get("terminated"):
                    return pod
        return None


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with private_cluster(tmp_path_factory.mktemp("preempt-cluster"), gpu_nodes=2) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def env(cluster, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("preempt-operator")
    install_crd_and_rbac(cluster)
    s3 = stage_tiny_run(cluster, NAMESPACE, tmp / "tiny")
    # The trainer's class, and the class of whatever may take its GPU (an inference service, say).
    for name, value in (("qlora-batch", 1000), ("urgent-serving", 1000000)):
        kubectl(cluster, "apply", "-f", "-", input=json.dumps({
            "apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass", "metadata": {"name": name},
            "value": value, "description": "promise 3 test"}))
    operator = OperatorProcess(service_account_kubeconfig(cluster, tmp / "operator.kubeconfig"), NAMESPACE,
                               tmp / "operator.log", trainer_image=TRAINER_IMAGE).start()
    pods = PodHistory(cluster.kubeconfig)
    kubectl(cluster, "apply", "-f", "-", input=json.dumps(manifest(cluster.s3_endpoint)))
    yield {"cluster": cluster, "s3": s3, "operator": operator, "pods": pods, "resumes": []}
    pods.stop()
    operator.stop()


def manifest(endpoint: str) -> dict:
    return {
        "apiVersion": "training.qlora-operator.dev/v1alpha1",
        "kind": "QLoRAJob",
        "metadata": {"name": JOB, "namespace": NAMESPACE},
        "spec": {
            "model": {"uri": "s3://models/tiny/"},
            "dataset": {"uri": "s3://data/train.jsonl"},
            "quantization": {"computeDtype": "float32"},
            "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
            "training": {"maxSteps": MAX_STEPS, "learningRate": 0.01, "batchSize": 2, "gradientAccumulationSteps": 2,
                         "maxSeqLength": 64, "gradientCheckpointing": False, "loggingSteps": 1,
                         "checkpointSteps": CHECKPOINT_STEPS, "warmupSteps": 1,
                         "evalMaxTokens": 512},  # each trainer start evaluates before it trains
            "resources": {"memory": "4Gi", "priorityClassName": "qlora-batch"},
            "backoffLimit": 2,
            "output": {"bucket": "adapters", "prefix": "runs", "endpointUrl": endpoint, "addressingStyle": "path",
                       "credentialsSecretRef": {"name": "minio"}},
        },
    }


def status(env) -> dict:
    return qlorajob_status(env["cluster"], NAMESPACE, JOB)


def wait_until(env, what: str, check, timeout: float = 180, every: float = 0.3):
    """check() until it returns something truthy; on timeout fail with the status and the operator's log."""
    return wait_for(what, check, timeout, every=every, explain=lambda: f"status: {json.dumps(status(env), indent=1)}\n"
                    f"operator log:\n{env['operator'].log_tail(30)}")


def complete_checkpoints(s3) -> dict[int, str]:
    """step -> s3:// folder of every checkpoint whose manifest (written last) is in S3."""
    found = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket="adapters", Prefix="runs/"):
        for obj in page.get("Contents", []):
            m = re.match(r"(.*/checkpoints/step-(\d+)/)manifest\.json$", obj["Key"])
            if m:
                found[int(m.group(2))] = f"s3://adapters/{m.group(1)}"
    return found


def running_trainer(env) -> tuple[str, str, dict]:
    """Once the trainer runs and the status names a checkpoint newer than the last resume: the pod,
    its node, and the status then. A disruption before any checkpoint would prove nothing."""
    after = env["resumes"][-1] if env["resumes"] else 0

    def ready():
        st = status(env)
        progress = st.get("progress") or {}
        if st.get("phase") != "Running" or (progress.get("checkpointStep") or 0) <= after:
            return None
        live = [p for p in env["pods"].trainer_pods() if p not in env["pods"].deleted
                and env["pods"].last(p).get("status", {}).get("phase") == "Running"]
        return (live[-1], env["pods"].last(live[-1])["spec"]["nodeName"], st) if live else None

    return wait_until(env, f"a checkpoint after step {after} while training", ready, timeout=240)


def check_disruption_cost_nothing(env, pod: str, before: dict, condition_reason: str, event_reason: str) -> dict:
    """The old pod stopped gracefully and checkpointed; a replacement in the same Job resumed at
    exactly that checkpoint; the attempt count did not move. Returns the replacement pod's last version."""
    pods, s3 = env["pods"], env["s3"]
    wait_until(env, f"pod {pod} to be stopped and deleted", lambda: pod in pods.deleted, timeout=GRACE_SECONDS + 30)
    # Read S3 at once: the replacement needs half a minute before it could upload anything newer.
    checkpoints = complete_checkpoints(s3)
    newest = max(checkpoints)

    # The node agent stopped it as a kubelet does: DisruptionTarget kept, deletion with the pod's grace
    # period, SIGTERM first (the trainer exits INTERRUPTED after its checkpoint, not 137 from SIGKILL).
    final = pods.final(pod)
    assert final is not None, f"pod {pod} was deleted without a terminated trainer: {pods.last(pod)}"
    disruption = next(c for c in final["status"]["conditions"] if c["type"] == "DisruptionTarget")
    assert (disruption["status"], disruption["reason"]) == ("True", condition_reason)
    asked = pods.deletion_requested(pod)
    assert asked["metadata"]["deletionGracePeriodSeconds"] == GRACE_SECONDS, asked["metadata"]
    terminated = next(cs for cs in final["status"]["containerStatuses"] if cs["name"] == "trainer")["state"]["terminated"]
    assert terminated["exitCode"] == INTERRUPTED, terminated
    # deletionTimestamp is the end of the grace period; the trainer was done well before it.
    assert terminated["finishedAt"] < asked["metadata"]["deletionTimestamp"], (terminated, asked["metadata"])
    stopped_at = int(re.search(r"stopped by SIGTERM at step (\d+)", terminated["message"]).group(1))
    # The SIGTERM checkpoint is the newest one: the old pod lost nothing it had trained, and at
    # least as far as the operator saw it get.
    assert newest == stopped_at >= before["progress"]["step"], (checkpoints, terminated["message"], before)

    # The replacement: same Job (attempt 1), and its first report says it resumed right there.
    def resumed():
        st = status(env)
        progress = st.get("progress") or {}
        if progress.get("resumedFromStep") not in (None, *env["resumes"]):
            return st
        return None

    after = wait_until(env, "the replacement pod's resume report", resumed, timeout=180)
    progress = after["progress"]
    assert progress["resumedFromStep"] == newest, (progress, checkpoints)
    # (It may have uploaded a newer one by now: the status follows the pod's latest report.)
    folder = checkpoints[newest].removesuffix(f"step-{newest}/")
    assert progress["checkpointStep"] >= newest
    assert progress["checkpointUri"] == f"{folder}step-{progress['checkpointStep']}/", (progress, checkpoints)
    lost = stopped_at - progress["resumedFromStep"]
    assert 0 <= lost <= CHECKPOINT_STEPS
    env["resumes"].append(progress["resumedFromStep"])

    assert after["attempts"] == 1 and after["jobName"] == f"{JOB}-1", after
    jobs = json.loads(kubectl(env["cluster"], "-n", NAMESPACE, "get", "jobs", "-o", "json").stdout)["items"]
    assert [j["metadata"]["name"] for j in jobs] == [f"{JOB}-1"]
    replacement = pods.trainer_pods()[-1]
    assert replacement != pod and pods.last(replacement)["metadata"]["labels"][JOB_LABEL] == f"{JOB}-1"
    events = kubectl(env["cluster"], "-n", NAMESPACE, "get", "events", "--field-selector",
                     f"involvedObject.kind=QLoRAJob,reason={event_reason}", "-o", "json").stdout
    assert any(pod in e["message"] for e in json.loads(events)["items"]), events
    return pods.last(replacement)


def test_eviction_costs_no_attempt_and_resumes_at_the_newest_checkpoint(env):
    pod, _, before = running_trainer(env)
    eviction = {"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": pod, "namespace": NAMESPACE}}
    kubectl(env["cluster"], "create", "--raw", f"/api/v1/namespaces/{NAMESPACE}/pods/{pod}/eviction", "-f", "-",
            input=json.dumps(eviction))
    check_disruption_cost_nothing(env, pod, before, "EvictionByEvictionAPI", "Evicted")


def test_node_drain_moves_the_trainer_without_an_attempt_and_resumes_at_the_newest_checkpoint(env):
    pod, node, before = running_trainer(env)
    cluster = env["cluster"]
    try:
        # What an operator of the cluster types: cordon, then evict everything (it waits for the pod to go).
        drained = kubectl(cluster, "drain", node, "--ignore-daemonsets", "--delete-emptydir-data",
                          "--timeout=180s", check=False)
        assert drained.returncode == 0, drained.stderr
        assert json.loads(kubectl(cluster, "get", "node", node, "-o", "json").stdout)["spec"]["unschedulable"]
        replacement = check_disruption_cost_nothing(env, pod, before, "EvictionByEvictionAPI", "Evicted")
        assert replacement["spec"]["nodeName"] not in (None, node)  # it ran elsewhere
    finally:
        kubectl(cluster, "uncordon", node, check=False)


def test_priority_preemption_costs_no_attempt_and_resumes_at_the_newest_checkpoint(env):
    pod, node, before = running_trainer(env)
    cluster = env["cluster"]
    urgent = {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "urgent", "namespace": NAMESPACE},
        "spec": {
            "priorityClassName": "urgent-serving",
            # Only the trainer's node will do, so the scheduler must preempt rather than use the free one.
            "nodeSelector": {"kubernetes.io/hostname": node},
            "terminationGracePeriodSeconds": 0,
            "containers": [{"name": "serve", "image": "registry.k8s.io/pause:3.10",
                            "resources": {"limits": {"nvidia.com/gpu": "1"}}}],
        },
    }
    try:
        kubectl(cluster, "apply", "-f", "-", input=json.dumps(urgent))
        replacement = check_disruption_cost_nothing(env, pod, before, "PreemptionByScheduler", "Preempted")
        assert replacement["spec"]["nodeName"] not in (None, node)
        took = wait_until(env, "the urgent pod to run on the trainer's node", lambda: (
            p := json.loads(kubectl(cluster, "-n", NAMESPACE, "get", "pod", "urgent", "-o", "json").stdout)
        )["status"].get("phase") == "Running" and p)
        assert took["spec"]["nodeName"] == node
    finally:
        kubectl(cluster, "-n", NAMESPACE, "delete", "pod", "urgent", "--grace-period=0", "--wait=false", check=False)


def test_after_three_disruptions_the_run_succeeds_in_its_first_attempt(env):
    done = wait_until(env, "Succeeded", lambda: (st := status(env)).get("phase") in ("Succeeded", "Failed") and st,
                      timeout=240)
    assert done["phase"] == "Succeeded", done
    assert done["attempts"] == 1
    assert done["result"]["resumedFromStep"] == env["resumes"][-1]
    assert done["progress"]["step"] == MAX_STEPS
    trainers = env["pods"].trainer_pods()
    assert len(trainers) == 1 + len(env["resumes"]) == 4, trainers
    assert {env["pods"].last(p)["metadata"]["labels"][JOB_LABEL] for p in trainers} == {f"{JOB}-1"}
    described = kubectl(env["cluster"], "-n", NAMESPACE, "describe", "qlorajob", JOB).stdout
    assert re.search(rf"Resumed From Step:\s+{env['resumes'][-1]}\b", described), described
