"""Promise 10: deletion never hangs. A QLoRAJob deleted while the operator is down, while S3 is down,
or while both are, is gone at once, and its Job, pod and ConfigMap within GONE_S (GONE_S3_DOWN_S with S3 down), the trainer's
processes stopped; no finalizer of ours is ever on a QLoRAJob, Job or pod.

Why it holds: QLoRAJobs carry no finalizer (the resync is a thread, not a kopf timer: see
operator/qlora_operator/resync.py), so deleting one needs no operator; the garbage collector
(kube-controller-manager) deletes its Job and ConfigMap through their owner references, then the
Job's pods; the node agent sends each pod's processes SIGTERM and SIGKILL after the pod's grace
period (120 s for a trainer), so a trainer stuck in S3 retries cannot hold its pod longer than that.

On a private local cluster (the shared one must keep its MinIO): real API server, garbage
collector, Job controller, node agent, MinIO. The scripted trainer either trains until released
(`gated`) or checkpoints to MinIO every step through the real trainer's S3 store (`s3-checkpoints`):
with MinIO stopped it is inside that store's retries (botocore's, then whole-transfer ones with
backoff) when the QLoRAJob is deleted, and it stops only once they give up.

    .venv/bin/pytest tests/test_promise_deletion.py -s      # prints the measured seconds
"""

import json
import time

import pytest
from qlora_api.protocol import TERMINATION_GRACE_SECONDS
from qlora_localcluster.testing import kubectl, private_cluster
from support.cluster_s3 import cluster_s3, credentials_secret
from support.finalizer_watch import FinalizerWatch
from support.operator_process import (
    OperatorProcess,
    fake_trainer_qlorajob,
    install_crd_and_rbac,
    service_account_kubeconfig,
)
from support.outages import pod_processes
from support.polling import operator_log, wait_for

pytestmark = pytest.mark.cluster
NAMESPACE = "deletion"
LABEL = "training.qlora-operator.dev/qlorajob"
DELETED_S = 5.0  # `kubectl delete` returns and the QLoRAJob is gone
GONE_S = 90.0  # its Job, pod and ConfigMap are gone and the trainer's processes have stopped
# With S3 down the trainer is inside its store's outage retries when SIGTERM comes: it stops when
# they give up (the scripted trainer's budget is 15 s) or, with the real trainer's 300 s budget, at
# the node agent's SIGKILL at the end of the pod's grace period, as a kubelet sends it. So the bound
# there is the grace period, plus slack.
GONE_S3_DOWN_S = TERMINATION_GRACE_SECONDS + 45.0
# Kubernetes' own: the Job controller's on a Job's pods (removed as it counts them), the garbage
# collector's while a foreground deletion waits for dependents.
KUBERNETES_FINALIZERS = {"batch.kubernetes.io/job-tracking", "foregroundDeletion"}
MEASURED: list[str] = []


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with private_cluster(tmp_path_factory.mktemp("deletion")) as c:
        install_crd_and_rbac(c)
        kubectl(c, "create", "namespace", NAMESPACE)
        credentials_secret(c, NAMESPACE, "s3")
        cluster_s3(c).create_bucket(Bucket="adapters")
        yield c
        print("\n" + "\n".join(MEASURED))


@pytest.fixture(scope="module")
def operator_kubeconfig(cluster, tmp_path_factory):
    return service_account_kubeconfig(cluster, tmp_path_factory.mktemp("deletion-operator") / "kubeconfig")


# (name, trainer scenario, operator down, S3 down, kubectl's --cascade). Foreground: the API server
# keeps the QLoRAJob (with Kubernetes' foregroundDeletion finalizer) until the garbage collector has
# deleted its Job, and the Job until its pod is gone, so the QLoRAJob goes within GONE_S, not DELETED_S.
CASES = [
    ("operator-down", "gated", True, False, "background"),
    ("s3-down", "s3-checkpoints", False, True, "background"),
    ("both-down", "s3-checkpoints", True, True, "background"),
    ("both-down-foreground", "s3-checkpoints", True, True, "foreground"),
]


@pytest.mark.parametrize(("name", "scenario", "operator_down", "s3_down", "cascade"), CASES,
                         ids=[c[0] for c in CASES])
def test_a_qlorajob_deleted_while_its_operator_or_s3_is_down_is_gone_and_its_trainer_stopped(
        cluster, operator_kubeconfig, tmp_path, name, scenario, operator_down, s3_down, cascade):
    operator = OperatorProcess(operator_kubeconfig, NAMESPACE, tmp_path / "operator.log").start()
    watch = FinalizerWatch(cluster, NAMESPACE).start()  # every version of every object, from here on
    try:
        kubectl(cluster, "apply", "-f", "-", input=fake_trainer_qlorajob(
            name, NAMESPACE, scenario, steps=100_000,
            output={"endpointUrl": cluster.s3_endpoint, "addressingStyle": "path"}))
        wait_for(f"{name} training", lambda: (status(cluster, name).get("progress") or {}).get("step", 0) >= 3,
                 60, explain=operator_log(operator))
        pod = only(objects(cluster, "pods", name))
        uid = pod["metadata"]["uid"]
        assert pod_processes(cluster, uid), "the trainer runs as a process of the node agent"
        assert_no_finalizers_of_ours(cluster, name)
        if operator_down:
            operator.kill9()
        if s3_down:
            cluster.stop_component("minio")
            log = cluster.state_dir / "nodes" / "gpu-node-0" / "pods" / uid / "logs" / "trainer" / "0.log"
            wait_for("the trainer retrying S3", lambda: "retrying" in log.read_text(errors="replace"), 60,
                     explain=operator_log(operator))

        gone_bound = GONE_S3_DOWN_S if s3_down else GONE_S
        bound = DELETED_S if cascade == "background" else gone_bound  # foreground: once its pod is gone
        started = time.monotonic()
        deleted = cluster.kubectl("-n", NAMESPACE, "delete", "qlorajob", name, f"--cascade={cascade}",
                                  f"--timeout={bound:.0f}s", timeout=bound + 30)  # waits until the object is gone
        deleted_s = time.monotonic() - started
        assert deleted.returncode == 0, deleted.stderr
        assert not objects(cluster, "qlorajobs", name, by_name=True)
        assert deleted_s <= bound

        wait_for(f"the trainer's processes of {name} to stop", lambda: not pod_processes(cluster, uid),
                 gone_bound, explain=operator_log(operator))
        stopped_s = time.monotonic() - started
        wait_for(f"the children of {name} to go", lambda: not any(
            objects(cluster, kind, name) for kind in ("jobs", "pods", "configmaps")), gone_bound,
                 explain=operator_log(operator))
        gone_s = time.monotonic() - started
        assert gone_s <= gone_bound
        watch.stop()
        ours = {key: found - KUBERNETES_FINALIZERS for key, found in watch.finalizers().items()
                if key[1].startswith(name) and found - KUBERNETES_FINALIZERS}
        assert not ours, ours
        # The watch does see finalizers: the Job controller's own is on the pod while it runs.
        assert "batch.kubernetes.io/job-tracking" in watch.finalizers().get(("pods", pod["metadata"]["name"]), ())
        MEASURED.append(f"{name}: QLoRAJob gone {deleted_s:.1f} s after the delete began, trainer processes "
                        f"stopped after {stopped_s:.1f} s, Job/pod/ConfigMap gone after {gone_s:.1f} s")
    finally:
        watch.stop()
        operator.stop()
        cluster.up()  # MinIO back for the next case


def assert_no_finalizers_of_ours(cluster, name) -> None:
    """Nothing of the operator's (nor kopf's) holds a deletion: the QLoRAJob and its Job carry no
    finalizer, its pod only the Job controller's (checked now, while it trains; the FinalizerWatch
    checks every version over the whole case)."""
    job = only(objects(cluster, "qlorajobs", name, by_name=True))
    assert not job["metadata"].get("finalizers"), job["metadata"]
    for kind in ("jobs", "pods", "configmaps"):
        for child in objects(cluster, kind, name):
            extra = set(child["metadata"].get("finalizers") or []) - KUBERNETES_FINALIZERS
            assert not extra, f"{kind} {child['metadata']['name']} carries {extra}"


def objects(cluster, kind, name, by_name=False) -> list[dict]:
    selector = ["--field-selector", f"metadata.name={name}"] if by_name else ["-l", f"{LABEL}={name}"]
    out = kubectl(cluster, "-n", NAMESPACE, "get", kind, *selector, "-o", "json").stdout
    return json.loads(out)["items"]


def only(items: list[dict]) -> dict:
    assert len(items) == 1, [i["metadata"]["name"] for i in items]
    return items[0]


def status(cluster, name) -> dict:
    items = objects(cluster, "qlorajobs", name, by_name=True)
    return (items[0].get("status") or {}) if items else {}
