"""Promise 8 and malformed data on the local cluster, with the real trainer (the node agent runs the
trainer image's entry of its image table) reading the cluster's MinIO: a permanent failure ends
Failed after one attempt although backoffLimit allows three more, with the trainer's reason and
message (file and line for bad data) in the QLoRAJob's status; a missing Secret is SecretNotFound
with the kubelet's words and what to create.

    .venv/bin/pytest tests/test_failure_reasons_cluster.py     # ~1-2 minutes once the cluster is up
"""

import json
import time

import pytest
from qlora_localcluster.testing import kubectl
from support.cluster_s3 import (
    ADAPTERS,
    DATA,
    MODELS,
    TRAINER_IMAGE,
    credentials_secret,
    upload_tiny_model_and_data,
)
from support.operator_process import OperatorProcess, install_crd_and_rbac, service_account_kubeconfig
from support.polling import qlorajob_status
from support.shared_gpu import wait_for_the_gpu
from trainer_fixtures.runs import jsonl
from trainer_fixtures.tiny_model import chat_records

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
LABEL = "training.qlora-operator.dev/qlorajob"


@pytest.fixture(scope="module")
def minio(local_cluster, tmp_path_factory):
    s3 = upload_tiny_model_and_data(local_cluster, tmp_path_factory.mktemp("tiny-base"))
    s3.put_object(Bucket=DATA, Key="latin1/train.jsonl",
                  Body=jsonl(chat_records(3, seed=1)) + b'{"text": "caf\xe9 au lait"}\n')
    return s3


@pytest.fixture
def operator(local_cluster, namespace, minio, tmp_path):
    install_crd_and_rbac(local_cluster)
    kubeconfig = service_account_kubeconfig(local_cluster, tmp_path / "operator.kubeconfig")
    credentials_secret(local_cluster, namespace)
    process = OperatorProcess(kubeconfig, namespace, tmp_path / "operator.log", trainer_image=TRAINER_IMAGE).start()
    yield process
    kubectl(local_cluster, "-n", namespace, "delete", "qlorajobs", "--all", "--wait=false", check=False)
    process.stop()


def manifest(namespace: str, endpoint: str, name: str, secret: str = "minio", **spec) -> str:
    body = {
        "model": {"uri": f"s3://{MODELS}/tiny-llama/"},
        "dataset": {"uri": f"s3://{DATA}/colours/train.jsonl"},
        "lora": {"r": 4, "alpha": 8},
        "training": {"maxSteps": 2, "maxSeqLength": 64, "batchSize": 2, "gradientAccumulationSteps": 1},
        "resources": {"memory": "4Gi"},
        "output": {"bucket": ADAPTERS, "endpointUrl": endpoint, "addressingStyle": "path",
                   "credentialsSecretRef": {"name": secret}},
        "backoffLimit": 3,
    }
    for key, value in spec.items():
        body[key] = {**body[key], **value} if isinstance(body.get(key), dict) else value
    return json.dumps({"apiVersion": "training.qlora-operator.dev/v1alpha1", "kind": "QLoRAJob",
                       "metadata": {"name": name, "namespace": namespace}, "spec": body})


def wait_status(cluster, namespace, name, check, operator, timeout=300.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        current = qlorajob_status(cluster, namespace, name)
        if check(current):
            return current
        time.sleep(1)
    logs = kubectl(cluster, "-n", namespace, "logs", f"job/{name}-1", check=False).stdout[-3000:]
    raise AssertionError(f"{name}: {current}\ntrainer log:\n{logs}\noperator log:\n{operator.log_tail()}")


def condition(current: dict, ctype: str) -> dict:
    return next((c for c in current.get("conditions", []) if c["type"] == ctype), {})


def trainer_jobs(cluster, namespace, name) -> list[str]:
    items = json.loads(kubectl(cluster, "-n", namespace, "get", "jobs", "-l", f"{LABEL}={name}", "-o",
                               "json").stdout)["items"]
    return sorted(i["metadata"]["name"] for i in items)


@pytest.mark.parametrize(("name", "spec", "reason", "says"), [
    ("unknown-module", {"lora": {"targetModules": ["q_proj", "query_key_value"]}}, "UnknownTargetModule",
     "spec.lora.targetModules names 'query_key_value'"),
    ("latin1-data", {"dataset": {"uri": f"s3://{DATA}/latin1/train.jsonl"}}, "BadData",
     "train.jsonl line 4: not UTF-8 (byte 0xe9"),
])
def test_a_permanent_trainer_failure_is_not_retried(local_cluster, namespace, operator, name, spec, reason, says):
    wait_for_the_gpu(local_cluster)
    kubectl(local_cluster, "apply", "-f", "-", input=manifest(namespace, local_cluster.s3_endpoint, name, **spec))
    final = wait_status(local_cluster, namespace, name, lambda s: s.get("phase") == "Failed", operator)
    failed = condition(final, "Failed")
    assert failed["reason"] == reason and says in failed["message"], failed
    assert says in final["message"]
    time.sleep(3)  # several resyncs: a retry would have created the next Job by now
    assert qlorajob_status(local_cluster, namespace, name)["attempts"] == 1
    assert trainer_jobs(local_cluster, namespace, name) == [f"{name}-1"]


def test_a_missing_secret_is_secret_not_found_and_the_pod_starts_once_it_exists(local_cluster, namespace, operator):
    wait_for_the_gpu(local_cluster)
    kubectl(local_cluster, "apply", "-f", "-",
            input=manifest(namespace, local_cluster.s3_endpoint, "no-secret", secret="not-yet",
                           lora={"targetModules": ["no_such_layer"]}))  # once it runs, it fails fast
    waiting = wait_status(local_cluster, namespace, "no-secret",
                          lambda s: condition(s, "Running").get("reason") == "SecretNotFound", operator, timeout=120)
    message = condition(waiting, "Running")["message"]
    assert 'secret "not-yet" not found' in message and f"create Secret not-yet in namespace {namespace}" in message
    assert waiting["phase"] == "Pending"
    creds = local_cluster.s3_credentials
    kubectl(local_cluster, "-n", namespace, "create", "secret", "generic", "not-yet",
            f"--from-literal=AWS_ACCESS_KEY_ID={creds['aws_access_key_id']}",
            f"--from-literal=AWS_SECRET_ACCESS_KEY={creds['aws_secret_access_key']}")
    final = wait_status(local_cluster, namespace, "no-secret", lambda s: s.get("phase") == "Failed", operator)
    assert condition(final, "Failed")["reason"] == "UnknownTargetModule" and final["attempts"] == 1
