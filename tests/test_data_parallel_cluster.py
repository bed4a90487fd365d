"""A two-worker QLoRAJob end to end on a private local cluster with two GPU nodes: the real operator
renders an Indexed Job and its headless Service, the real scheduler puts one pod on each node, the
node agents run the real trainer in each (torchrun, one rank per pod, gloo), the ranks meet at index
0's Service name, rank 0 alone publishes, and the status shows the group. Then a three-worker job on
the same two nodes waits Pending and says why (the gang wait without Kueue).

Private, not the shared cluster: that one has one GPU node with one GPU, and two workers need two
GPUs' worth of nodes. Its ports are free ones picked here, so it never meets the shared cluster's.
"""

import json
import time

import pytest
from qlora_localcluster.testing import kubectl, private_cluster
from support.cluster_s3 import stage_tiny_run
from support.operator_process import OperatorProcess, install_crd_and_rbac, service_account_kubeconfig

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
TRAINER_IMAGE = "ghcr.io/qlora-operator/trainer:0.1.0"
NAMESPACE = "dp"


@pytest.fixture(scope="module")
def two_node_cluster(tmp_path_factory):
    with private_cluster(tmp_path_factory.mktemp("dp-cluster"), gpu_nodes=2) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def operator(two_node_cluster, tmp_path_factory):
    cluster = two_node_cluster
    tmp = tmp_path_factory.mktemp("dp-operator")
    install_crd_and_rbac(cluster)
    s3 = stage_tiny_run(cluster, NAMESPACE, tmp / "tiny")
    proc = OperatorProcess(service_account_kubeconfig(cluster, tmp / "operator.kubeconfig"), NAMESPACE,
                           tmp / "operator.log", trainer_image=TRAINER_IMAGE).start()
    yield {"s3": s3, "process": proc}
    proc.stop()


def manifest(name: str, workers: int, endpoint: str) -> dict:
    return {
        "apiVersion": "training.qlora-operator.dev/v1alpha1",
        "kind": "QLoRAJob",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "model": {"uri": "s3://models/tiny/"},
            "dataset": {"uri": "s3://data/train.jsonl"},
            "quantization": {"computeDtype": "float32"},
            "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
            "training": {"maxSteps": 8, "learningRate": 0.01, "batchSize": 2, "gradientAccumulationSteps": 4,
                         "maxSeqLength": 64, "gradientCheckpointing": False, "loggingSteps": 2,
                         "checkpointSteps": 4, "warmupSteps": 1},
            "resources": {"memory": "4Gi", "workers": workers},
            "output": {"bucket": "adapters", "prefix": "runs", "endpointUrl": endpoint, "addressingStyle": "path",
                       "credentialsSecretRef": {"name": "minio"}},
        },
    }


def get(cluster, *args) -> dict:
    return json.loads(kubectl(cluster, "-n", NAMESPACE, "get", *args, "-o", "json").stdout)


def test_two_workers_train_as_one_group_on_two_nodes_and_publish_once(two_node_cluster, operator):
    cluster = two_node_cluster
    kubectl(cluster, "apply", "-f", "-", input=json.dumps(manifest("pair", 2, cluster.s3_endpoint)))
    waited = cluster.kubectl("-n", NAMESPACE, "wait", "--for=condition=Succeeded", "qlorajob/pair",
                             "--timeout=480s", timeout=500)
    logs = kubectl(cluster, "-n", NAMESPACE, "logs", "-l", "batch.kubernetes.io/job-name=pair-1",
                   "--tail=40", "--prefix", check=False).stdout
    described = kubectl(cluster, "-n", NAMESPACE, "describe", "qlorajob", "pair", check=False).stdout
    assert waited.returncode == 0, f"{waited.stderr}\n{described}\n{logs[-4000:]}\n{operator['process'].log_tail()}"

    status = get(cluster, "qlorajob", "pair")["status"]
    assert status["attempts"] == 1 and status["worldSize"] == 2
    workers = status["workers"]
    assert [w["index"] for w in workers] == [0, 1] and all(w["state"] == "Succeeded" for w in workers)
    assert {w["node"] for w in workers} == {"gpu-node-0", "gpu-node-1"}  # the scheduler spread them
    progress = status["progress"]
    assert progress["worldSize"] == 2 and progress["summary"] == "8/8 (100%)"
    assert progress["tokensPerSecondPerGpu"] == pytest.approx(progress["tokensPerSecond"] / 2, rel=0.01)

    job = get(cluster, "job", "pair-1")["spec"]
    assert (job["completionMode"], job["completions"]) == ("Indexed", 2)
    service = get(cluster, "service", "pair-1")["spec"]
    assert service["clusterIP"] == "None"

    uri = status["result"]["adapterUri"]
    prefix = uri.split("/", 3)[3]
    keys = [o["Key"] for o in operator["s3"].list_objects_v2(Bucket="adapters", Prefix=prefix)["Contents"]]
    assert [k for k in keys if k.endswith("manifest.json") and "/checkpoints/" not in k] == [prefix + "manifest.json"]
    config = json.loads(operator["s3"].get_object(Bucket="adapters", Key=prefix + "training_config.json")["Body"].read())
    assert config["resolved"]["worldSize"] == 2 and config["resolved"]["gradientAccumulationSteps"] == 2

    wide = kubectl(cluster, "-n", NAMESPACE, "get", "qlorajob", "pair", "-o", "wide").stdout
    assert "WORLD" in wide.splitlines()[0] and " 2 " in wide.splitlines()[1]


def test_a_group_larger_than_the_cluster_waits_pending_and_says_why(two_node_cluster, operator):
    cluster = two_node_cluster
    kubectl(cluster, "apply", "-f", "-", input=json.dumps(manifest("trio", 3, cluster.s3_endpoint)))
    try:
        deadline, message = time.monotonic() + 120, ""
        while time.monotonic() < deadline:
            status = get(cluster, "qlorajob", "trio").get("status", {})
            message = status.get("message") or ""
            if "of 3 workers have a node" in message:
                break
            time.sleep(1)
        assert "of 3 workers have a node; the group trains only when all 3 run together" in message, message
        assert "Insufficient nvidia.com/gpu" in message  # the scheduler's own words for the one left out
        assert status["phase"] == "Pending" and status["worldSize"] == 3
        scheduled = next(c for c in status["conditions"] if c["type"] == "Scheduled")
        assert (scheduled["status"], scheduled["reason"]) == ("False", "Unschedulable")
    finally:
        kubectl(cluster, "-n", NAMESPACE, "delete", "qlorajob", "trio", "--timeout=90s", check=False)
