"""After training: `qlora fetch` against the cluster's MinIO (verified, refusing tampered or partial
sets) and `qlora serve` manifests accepted by the API server (vLLM's Deployment, and KServe's
InferenceService with KServe's own CRDs from its Go module), with the vLLM init container's
verified download run as a real pod.

    .venv/bin/pytest tests/test_cli_fetch_serve.py
"""

import hashlib
import json
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from qlora_localcluster.testing import kubectl
from support.cli import qlora, s3_env
from support.operator_process import install_crd_and_rbac
from support.published import adapter_files, minio, publish_files, succeeded_job

pytestmark = pytest.mark.cluster
BUCKET = "cli-adapters"
KSERVE_MODULE = "github.com/kserve/kserve@v0.16.0"


@pytest.fixture
def published(local_cluster, namespace, tmp_path):
    """A job whose adapter sits in MinIO; its spec names an S3 endpoint only the cluster could reach."""
    install_crd_and_rbac(local_cluster)
    files = adapter_files()
    prefix = f"adapters/{namespace}/bot/run-1"
    result = publish_files(local_cluster, BUCKET, prefix, files, tmp_path / "staged")
    result.update(baseModel="Qwen/Qwen2.5-0.5B-Instruct", baseModelRevision="0123abc", loraRank=8, loraAlpha=16,
                  targetModules=["q_proj", "v_proj"])
    spec = {"model": {"uri": "hf://Qwen/Qwen2.5-0.5B-Instruct"}, "dataset": {"uri": "s3://data/chat.jsonl"},
            "output": {"bucket": BUCKET, "endpointUrl": local_cluster.s3_endpoint, "addressingStyle": "path",
                       "credentialsSecretRef": {"name": "minio"}},
            "lora": {"r": 8, "alpha": 16, "targetModules": ["q_proj", "v_proj"]}}
    creds = local_cluster.s3_credentials
    kubectl(local_cluster, "-n", namespace, "create", "secret", "generic", "minio",
            f"--from-literal=AWS_ACCESS_KEY_ID={creds['aws_access_key_id']}",
            f"--from-literal=AWS_SECRET_ACCESS_KEY={creds['aws_secret_access_key']}")
    job = succeeded_job(local_cluster, namespace, "bot", spec, result)
    return {"job": job, "files": files, "prefix": prefix, "namespace": namespace, "spec": spec, "result": result}


def fetch(cluster, ns, dest, *extra, env=None, name="bot"):
    return qlora(cluster, "-n", ns, "fetch", name, str(dest), *extra, env=env if env is not None else s3_env(cluster))


def test_fetch_downloads_every_file_verified_against_the_manifest(local_cluster, published, tmp_path):
    out = fetch(local_cluster, published["namespace"], tmp_path / "adapter")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("3 files (0.0 MB) from s3://cli-adapters/")
    for rel, body in published["files"].items():
        assert (tmp_path / "adapter" / rel).read_bytes() == body
    manifest = (tmp_path / "adapter" / "manifest.json").read_bytes()
    assert hashlib.sha256(manifest).hexdigest() == published["job"]["status"]["result"]["manifestSha256"]
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == sorted([*published["files"], "manifest.json"])


def test_fetch_refuses_a_tampered_file_and_leaves_nothing_behind(local_cluster, published, tmp_path):
    s3 = minio(local_cluster)
    s3.put_object(Bucket=BUCKET, Key=f"{published['prefix']}/adapter_model.safetensors", Body=b"\0" * 4096)
    out = fetch(local_cluster, published["namespace"], tmp_path / "adapter")
    assert out.returncode == 1
    assert "adapter_model.safetensors: 4096 bytes with sha256" in out.stderr and "tampered" in out.stderr
    assert list((tmp_path / "adapter").iterdir()) == []  # no file of the set, no staging folder


def test_fetch_refuses_a_partial_set_and_a_changed_manifest(local_cluster, published, tmp_path):
    s3, prefix = minio(local_cluster), published["prefix"]
    s3.delete_object(Bucket=BUCKET, Key=f"{prefix}/tokenizer.json")
    out = fetch(local_cluster, published["namespace"], tmp_path / "a")
    assert out.returncode == 1 and "tokenizer.json is in the manifest but not in S3: a partial set" in out.stderr

    manifest = json.loads(s3.get_object(Bucket=BUCKET, Key=f"{prefix}/manifest.json")["Body"].read())
    manifest["files"] = [f for f in manifest["files"] if f["path"] != "tokenizer.json"]  # hide the gap
    s3.put_object(Bucket=BUCKET, Key=f"{prefix}/manifest.json", Body=json.dumps(manifest).encode())
    out = fetch(local_cluster, published["namespace"], tmp_path / "b")
    assert out.returncode == 1 and "it was changed after the trainer published it" in out.stderr

    s3.delete_object(Bucket=BUCKET, Key=f"{prefix}/manifest.json")  # a publish cut short
    out = fetch(local_cluster, published["namespace"], tmp_path / "c")
    assert out.returncode == 1 and "is not (completely) published, refusing a partial set" in out.stderr


def test_fetch_takes_endpoint_and_credentials_like_boto3(local_cluster, published, tmp_path):
    ns = published["namespace"]
    denied = fetch(local_cluster, ns, tmp_path / "none", env={})  # no credentials at all
    assert denied.returncode == 1 and not (tmp_path / "none" / "adapter_config.json").exists()
    # The same adapter, but the spec's endpoint is one only the cluster could reach: the override wins.
    spec = {**published["spec"], "output": {**published["spec"]["output"], "endpointUrl": "http://127.0.0.1:9"}}
    succeeded_job(local_cluster, ns, "far", spec, published["result"])
    creds = local_cluster.s3_credentials
    out = fetch(local_cluster, ns, tmp_path / "flags", "--endpoint-url", local_cluster.s3_endpoint,
                "--access-key-id", creds["aws_access_key_id"], "--secret-access-key", creds["aws_secret_access_key"],
                env={}, name="far")
    assert out.returncode == 0, out.stderr
    out = fetch(local_cluster, ns, tmp_path / "env", name="far",
                env={**s3_env(local_cluster), "AWS_ENDPOINT_URL": local_cluster.s3_endpoint})
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "env" / "adapter_model.safetensors").read_bytes() == published["files"]["adapter_model.safetensors"]


def server_dry_run(cluster, namespace, manifest_yaml):
    return kubectl(cluster, "-n", namespace, "apply", "--dry-run=server", "-f", "-", input=manifest_yaml, check=False)


def test_vllm_manifest_is_accepted_and_its_init_container_verifies_the_adapter(local_cluster, published):
    ns = published["namespace"]
    out = qlora(local_cluster, "-n", ns, "serve", "bot", "--for", "vllm")
    assert out.returncode == 0, out.stderr
    applied = server_dry_run(local_cluster, ns, out.stdout)
    assert applied.returncode == 0, applied.stderr
    assert "deployment.apps/bot-vllm created (server dry run)" in applied.stdout
    assert "service/bot-vllm created (server dry run)" in applied.stdout
    deployment = next(d for d in yaml.safe_load_all(out.stdout) if d["kind"] == "Deployment")
    init = deployment["spec"]["template"]["spec"]["initContainers"][0]
    assert run_fetch_pod(local_cluster, ns, init, "fetch-ok") == ("Succeeded", "adapter verified against manifest.json")
    minio(local_cluster).put_object(Bucket=BUCKET, Key=f"{published['prefix']}/tokenizer.json", Body=b"{}")
    phase, log = run_fetch_pod(local_cluster, ns, init, "fetch-tampered")
    assert phase == "Failed" and "tokenizer.json does not match the manifest" in log


def run_fetch_pod(cluster, namespace, init, name, timeout=90):
    """The init container's command and env as a pod of its own (a python image on the local node)."""
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": namespace},
           "spec": {"restartPolicy": "Never",
                    "containers": [{**init, "name": "fetch", "image": "python:3.12-slim"}],
                    "volumes": [{"name": "adapters", "emptyDir": {}}, {"name": "models", "emptyDir": {}}]}}
    kubectl(cluster, "apply", "-f", "-", input=json.dumps(pod))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        phase = json.loads(kubectl(cluster, "-n", namespace, "get", "pod", name, "-o", "json").stdout)["status"].get("phase")
        if phase in ("Succeeded", "Failed"):
            return phase, kubectl(cluster, "-n", namespace, "logs", name, check=False).stdout.strip()
        time.sleep(1)
    raise AssertionError(f"pod {name} did not finish: {kubectl(cluster, '-n', namespace, 'describe', 'pod', name).stdout}")


@pytest.fixture(scope="module")
def kserve_crds(local_cluster):
    """KServe's InferenceService CRD from its released Go module (the Go cache, not this repository)."""
    out = subprocess.run(["go", "mod", "download", "-json", KSERVE_MODULE], capture_output=True, text=True,
                         timeout=300, check=True)
    crd = Path(json.loads(out.stdout)["Dir"]) / "config/crd/full/serving.kserve.io_inferenceservices.yaml"
    # 1 MB: too large for client-side apply's last-applied annotation.
    kubectl(local_cluster, "apply", "--server-side", "--force-conflicts", "-f", str(crd))
    deadline = time.monotonic() + 60  # `kubectl wait` fails while the CRD has no conditions at all
    while time.monotonic() < deadline:
        crd_status = json.loads(kubectl(local_cluster, "get", "crd", "inferenceservices.serving.kserve.io",
                                        "-o", "json").stdout).get("status") or {}
        if any(c["type"] == "Established" and c["status"] == "True" for c in crd_status.get("conditions") or []):
            return
        time.sleep(0.5)
    raise AssertionError("KServe's InferenceService CRD was not Established within 60 s")


def test_kserve_inference_service_is_accepted_by_kserves_schema(local_cluster, published, kserve_crds):
    ns = published["namespace"]
    out = qlora(local_cluster, "-n", ns, "serve", "bot", "--for", "kserve", "--service-account", "s3-reader")
    assert out.returncode == 0, out.stderr
    applied = server_dry_run(local_cluster, ns, out.stdout)
    assert applied.returncode == 0, applied.stderr
    assert "inferenceservice.serving.kserve.io/bot created (server dry run)" in applied.stdout
    # The schema is really checked: a field KServe does not know is refused.
    broken = yaml.safe_load(out.stdout)
    broken["spec"]["predictor"]["model"]["loraAdapters"] = ["bot"]
    refused = kubectl(local_cluster, "-n", ns, "apply", "--dry-run=server", "--validate=strict", "-f", "-",
                      input=yaml.safe_dump(broken), check=False)
    assert refused.returncode != 0 and "loraAdapters" in refused.stderr
