"""The whole product, as a user meets it: a QLoRAJob applied with kubectl on the local cluster, the
real operator (as its own ServiceAccount), the real trainer run by the node agent from the trainer
image's entry in its image table, the base model and data read from the cluster's MinIO, and the
published adapter downloaded from MinIO and loaded with peft.

The base model is the suite's tiny Llama (the demo runs the same path with SmolLM2-135M)."""

import hashlib
import json
import time

import boto3
import pytest
import torch
from botocore.config import Config
from qlora_localcluster.testing import kubectl
from support.operator_process import OperatorProcess, install_crd_and_rbac, service_account_kubeconfig
from support.shared_gpu import wait_for_the_gpu
from trainer_fixtures.runs import jsonl
from trainer_fixtures.tiny_model import build_model, chat_records

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
TRAINER_IMAGE = "ghcr.io/qlora-operator/trainer:0.2.0"  # the chart's default; the node agent runs qlora_trainer for it


@pytest.fixture(scope="module")
def minio(local_cluster):
    s3 = boto3.client("s3", endpoint_url=local_cluster.s3_endpoint, region_name="us-east-1",
                      config=Config(s3={"addressing_style": "path"}), **local_cluster.s3_credentials)
    for bucket in ("e2e-models", "e2e-data", "e2e-adapters"):
        try:
            s3.create_bucket(Bucket=bucket)
        except s3.exceptions.BucketAlreadyOwnedByYou:
            pass
    return s3


@pytest.fixture(scope="module")
def tiny_base(minio, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-base")
    build_model(folder)
    for path in folder.iterdir():
        minio.upload_file(str(path), "e2e-models", f"tiny-llama/{path.name}")
    minio.put_object(Bucket="e2e-data", Key="colours/train.jsonl", Body=jsonl(chat_records(240, seed=1)))
    minio.put_object(Bucket="e2e-data", Key="colours/eval.jsonl", Body=jsonl(chat_records(40, seed=2)))
    return folder


def job_manifest(namespace: str, endpoint: str) -> dict:
    return {
        "apiVersion": "training.qlora-operator.dev/v1alpha1",
        "kind": "QLoRAJob",
        "metadata": {"name": "colours", "namespace": namespace},
        "spec": {
            "model": {"uri": "s3://e2e-models/tiny-llama/"},
            "dataset": {"uri": "s3://e2e-data/colours/train.jsonl", "evalUri": "s3://e2e-data/colours/eval.jsonl"},
            "quantization": {"computeDtype": "float32"},
            "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
            "training": {"maxSteps": 40, "learningRate": 0.01, "batchSize": 8, "gradientAccumulationSteps": 1,
                         "maxSeqLength": 64, "packing": False, "gradientCheckpointing": False,
                         "loggingSteps": 5, "checkpointSteps": 20, "warmupSteps": 2},
            "resources": {"memory": "4Gi"},
            "output": {"bucket": "e2e-adapters", "prefix": "runs", "endpointUrl": endpoint,
                       "addressingStyle": "path", "credentialsSecretRef": {"name": "minio"}},
        },
    }


def start_operator(local_cluster, namespace, tmp_path) -> OperatorProcess:
    """The CRD, the operator's RBAC and the trainer's S3 Secret in `namespace`, then the operator,
    once the cluster's one GPU is free (another test's trainer may hold it)."""
    install_crd_and_rbac(local_cluster)
    kubeconfig = service_account_kubeconfig(local_cluster, tmp_path / "operator.kubeconfig")
    creds = local_cluster.s3_credentials
    kubectl(local_cluster, "-n", namespace, "create", "secret", "generic", "minio",
            f"--from-literal=AWS_ACCESS_KEY_ID={creds['aws_access_key_id']}",
            f"--from-literal=AWS_SECRET_ACCESS_KEY={creds['aws_secret_access_key']}")
    wait_for_the_gpu(local_cluster)
    return OperatorProcess(kubeconfig, namespace, tmp_path / "operator.log", trainer_image=TRAINER_IMAGE).start()


@pytest.fixture
def finished_job(local_cluster, namespace, minio, tiny_base, tmp_path):
    operator = start_operator(local_cluster, namespace, tmp_path)
    try:
        kubectl(local_cluster, "apply", "-f", "-", input=json.dumps(job_manifest(namespace, local_cluster.s3_endpoint)))
        started = time.monotonic()
        # kubectl() stops any command after 60 s: the wait gets its own 600 s (and kubectl's exit after).
        waited = local_cluster.kubectl("-n", namespace, "wait", "--for=condition=Succeeded", "qlorajob/colours",
                                       "--timeout=600s", timeout=630)
        trainer_logs = kubectl(local_cluster, "-n", namespace, "logs", "job/colours-1", check=False).stdout
        assert waited.returncode == 0, f"{waited.stderr}\n{trainer_logs[-3000:]}\n{operator.log_tail()}"
        job = json.loads(kubectl(local_cluster, "-n", namespace, "get", "qlorajob", "colours", "-o", "json").stdout)
        yield {"job": job, "logs": trainer_logs, "seconds": time.monotonic() - started, "namespace": namespace}
    finally:
        kubectl(local_cluster, "-n", namespace, "delete", "qlorajob", "colours", "--timeout=60s", check=False)
        operator.stop()


def download_adapter(minio, adapter_uri: str, dest):
    bucket, _, prefix = adapter_uri.removeprefix("s3://").partition("/")
    manifest = json.loads(minio.get_object(Bucket=bucket, Key=prefix + "manifest.json")["Body"].read())
    for entry in manifest["files"]:
        body = minio.get_object(Bucket=bucket, Key=prefix + entry["path"])["Body"].read()
        assert hashlib.sha256(body).hexdigest() == entry["sha256"] and len(body) == entry["size"], entry["path"]
        (dest / entry["path"]).parent.mkdir(parents=True, exist_ok=True)
        (dest / entry["path"]).write_bytes(body)
    return manifest


def reply_loss(model, tokenizer, records) -> float:
    """Mean loss on the assistant replies only: what the adapter was trained on."""
    losses = []
    for record in records:
        prompt = tokenizer.apply_chat_template(record["messages"][:1], add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(record["messages"], tokenize=False)
        ids = tokenizer(full, return_tensors="pt")["input_ids"]
        labels = ids.clone()
        labels[:, : len(tokenizer(prompt)["input_ids"])] = -100
        with torch.no_grad():
            losses.append(model(input_ids=ids, labels=labels).loss.item())
    return sum(losses) / len(losses)


def test_a_qlorajob_trains_publishes_and_the_adapter_loads_from_s3(finished_job, minio, tiny_base, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    job, namespace = finished_job["job"], finished_job["namespace"]
    status, result = job["status"], job["status"]["result"]
    assert status["phase"] == "Succeeded" and status["attempts"] == 1
    assert result["adapterUri"] == f"s3://e2e-adapters/runs/{namespace}/colours/{job['metadata']['uid']}/"
    assert result["evalLossAfter"] < 0.5 * result["evalLossBefore"], result
    assert status["progress"]["summary"] == "40/40 (100%)"
    assert '"event":"progress"' in finished_job["logs"]

    manifest = download_adapter(minio, result["adapterUri"], tmp_path)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {f["path"] for f in manifest["files"]}
    published = minio.get_object(Bucket="e2e-adapters", Key=result["adapterUri"].split("/", 3)[3] + "manifest.json")
    assert hashlib.sha256(published["Body"].read()).hexdigest() == result["manifestSha256"]

    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    held_out = chat_records(40, seed=2)
    base = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    before = reply_loss(base, tokenizer, held_out)
    tuned = PeftModel.from_pretrained(base, tmp_path)
    assert reply_loss(tuned, tokenizer, held_out) < 0.5 * before


def test_a_result_lost_with_its_pod_is_read_back_without_training(local_cluster, namespace, minio, tiny_base,
                                                                  tmp_path):
    """The trainer published and exited 0, and its pod was deleted before the operator read the
    result in its termination message (here the operator is down meanwhile; a preemption that races
    the trainer's last seconds does the same). The operator then sees a completed Job without the
    pod: it starts one more attempt, whose trainer finds the publication and reports it without
    training, and the QLoRAJob succeeds with the first attempt's adapter."""
    operator = start_operator(local_cluster, namespace, tmp_path)
    manifest = job_manifest(namespace, local_cluster.s3_endpoint)
    manifest["metadata"]["name"] = "lost"
    manifest["spec"]["training"].update(maxSteps=10, checkpointSteps=100)

    def status() -> dict:
        got = kubectl(local_cluster, "-n", namespace, "get", "qlorajob", "lost", "-o", "json").stdout
        return json.loads(got).get("status") or {}

    def wait(what, check, timeout=300):
        deadline = time.monotonic() + timeout
        while not (found := check()):
            assert time.monotonic() < deadline, f"timed out waiting for {what}: {status()}\n{operator.log_tail()}"
            time.sleep(0.5)
        return found

    try:
        kubectl(local_cluster, "apply", "-f", "-", input=json.dumps(manifest))
        wait("the trainer to run", lambda: status().get("phase") == "Running" and status().get("jobName") == "lost-1")
        operator.stop()
        waited = local_cluster.kubectl("-n", namespace, "wait", "--for=condition=Complete", "job/lost-1",
                                       "--timeout=300s", timeout=330)
        assert waited.returncode == 0, waited.stderr
        first_log = kubectl(local_cluster, "-n", namespace, "logs", "job/lost-1").stdout
        kubectl(local_cluster, "-n", namespace, "delete", "pod", "-l", "batch.kubernetes.io/job-name=lost-1",
                "--timeout=60s")
        assert status().get("phase") == "Running"  # the operator never saw the result
        operator.start()
        done = wait("Succeeded", lambda: (st := status()).get("phase") in ("Succeeded", "Failed") and st)
        assert done["phase"] == "Succeeded", done
        assert done["attempts"] == 2 and done["jobName"] == "lost-2", done
        uid = json.loads(kubectl(local_cluster, "-n", namespace, "get", "qlorajob", "lost", "-o", "json").stdout)[
            "metadata"]["uid"]
        assert done["result"]["adapterUri"] == f"s3://e2e-adapters/runs/{namespace}/lost/{uid}/"
        assert done["result"]["adapterUri"] in first_log  # what attempt 1 published
        second_log = kubectl(local_cluster, "-n", namespace, "logs", "job/lost-2").stdout
        assert "is already published" in second_log and '"event":"progress"' not in second_log, second_log[-2000:]
        events = json.loads(kubectl(local_cluster, "-n", namespace, "get", "events", "--field-selector",
                                    "involvedObject.kind=QLoRAJob,reason=ResultMissing", "-o", "json").stdout)
        assert any("reads the published adapter back" in e["message"] for e in events["items"]), events
    finally:
        kubectl(local_cluster, "-n", namespace, "delete", "qlorajob", "lost", "--timeout=60s", check=False)
        operator.stop()
