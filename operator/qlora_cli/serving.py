"""Serving manifests for a published adapter: a vLLM Deployment and a KServe InferenceService. Pure.

Both read what the status says a server needs (status.result: baseModel, baseModelRevision,
adapterUri, manifestSha256, loraRank) and the job's S3 settings (spec.output), so the manifest is
a function of the QLoRAJob alone and can be reviewed, committed to GitOps, or piped to kubectl.
"""

import json

import yaml

VLLM_IMAGE = "vllm/vllm-openai:v0.11.0"
FETCH_IMAGE = "ghcr.io/qlora-operator/trainer:0.2.0"  # has python and boto3: the adapter is verified in-cluster
ADAPTER_ROOT = "/adapters"
MODEL_ROOT = "/models"
# vLLM accepts these --max-lora-rank values; the smallest that holds the adapter's rank wastes least memory.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)

# Runs in the init container: the same rules as `qlora fetch` (manifest digest from the status,
# then size and sha256 of every file), so a tampered or partial adapter never reaches the server.
FETCH_SCRIPT = """
import hashlib, json, os, sys, boto3
from botocore.config import Config
uri, want, dest, base = sys.argv[1:5]
s3 = boto3.client("s3", endpoint_url=os.environ.get("S3_ENDPOINT") or None,
                  region_name=os.environ.get("AWS_REGION", "us-east-1"),
                  config=Config(s3={"addressing_style": os.environ.get("S3_ADDRESSING_STYLE", "auto")}))
def split(u):
    b, _, k = u[5:].partition("/")
    return b, k
bucket, prefix = split(uri)
body = s3.get_object(Bucket=bucket, Key=prefix + "manifest.json")["Body"].read()
if want and hashlib.sha256(body).hexdigest() != want:
    sys.exit("manifest.json does not match the digest in the job's status")
for f in json.loads(body)["files"]:
    if f["path"].startswith("merged/"):
        continue
    data = s3.get_object(Bucket=bucket, Key=prefix + f["path"])["Body"].read()
    if len(data) != f["size"] or hashlib.sha256(data).hexdigest() != f["sha256"]:
        sys.exit(f["path"] + " does not match the manifest")
    path = os.path.join(dest, f["path"])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    open(path, "wb").write(data)
if base.startswith("s3://"):
    bucket, prefix = split(base.rstrip("/") + "/")
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for o in page.get("Contents", []):
            path = os.path.join(os.environ["MODEL_DIR"], o["Key"][len(prefix):])
            os.makedirs(os.path.dirname(path), exist_ok=True)
            s3.download_file(bucket, o["Key"], path)
print("adapter verified against manifest.json")
""".strip()


def max_lora_rank(rank: int | None) -> int:
    rank = rank or 16
    return next((r for r in VLLM_LORA_RANKS if r >= rank), VLLM_LORA_RANKS[-1])


def serving_facts(job: dict) -> dict:
    result = (job.get("status") or {}).get("result") or {}
    spec = job["spec"]
    base = result.get("baseModel") or spec["model"]["uri"].removeprefix("hf://")
    return {
        "name": job["metadata"]["name"],
        "namespace": job["metadata"].get("namespace"),
        "base": base,
        "revision": result.get("baseModelRevision") or spec["model"].get("revision"),
        "adapter_uri": result["adapterUri"],
        "manifest_sha256": result.get("manifestSha256") or "",
        "rank": result.get("loraRank") or (spec.get("lora") or {}).get("r", 16),
        "output": spec["output"],
    }


def _labels(name: str) -> dict:
    return {"app.kubernetes.io/name": "vllm", "app.kubernetes.io/instance": name,
            "app.kubernetes.io/part-of": "qlora-operator"}


def _s3_env(output: dict) -> list[dict]:
    env = [{"name": "AWS_REGION", "value": output.get("region", "us-east-1")},
           {"name": "S3_ADDRESSING_STYLE", "value": output.get("addressingStyle", "auto")}]
    if output.get("endpointUrl"):
        env.append({"name": "S3_ENDPOINT", "value": output["endpointUrl"]})
    ref = output.get("credentialsSecretRef")
    if ref:
        for var, key in (("AWS_ACCESS_KEY_ID", ref.get("accessKeyIdKey", "AWS_ACCESS_KEY_ID")),
                         ("AWS_SECRET_ACCESS_KEY", ref.get("secretAccessKeyKey", "AWS_SECRET_ACCESS_KEY"))):
            env.append({"name": var, "valueFrom": {"secretKeyRef": {"name": ref["name"], "key": key}}})
    return env


def _is_hub_id(base: str) -> bool:
    return not base.startswith(("s3://", "pvc://"))


def vllm_manifests(job: dict, image: str = VLLM_IMAGE, fetch_image: str = FETCH_IMAGE, gpus: int = 1) -> list[dict]:
    """A Deployment running `vllm serve <base> --enable-lora` with the adapter fetched and verified
    by an init container, and a Service for its OpenAI-compatible API on port 8000."""
    f = serving_facts(job)
    name, adapter_dir = f"{f['name']}-vllm", f"{ADAPTER_ROOT}/{f['name']}"
    model = f["base"] if _is_hub_id(f["base"]) else MODEL_ROOT
    args = [model, "--enable-lora", "--lora-modules", f"{f['name']}={adapter_dir}",
            "--max-lora-rank", str(max_lora_rank(f["rank"])), "--port", "8000"]
    if f["revision"] and _is_hub_id(f["base"]) and not f["revision"].startswith("sha256:"):
        args += ["--revision", f["revision"]]
    volumes = [{"name": "adapters", "emptyDir": {}}, {"name": "models", "emptyDir": {}}]
    mounts = [{"name": "adapters", "mountPath": ADAPTER_ROOT}, {"name": "models", "mountPath": MODEL_ROOT}]
    init = {
        "name": "fetch-adapter",
        "image": fetch_image,
        "command": ["python", "-c", FETCH_SCRIPT, f["adapter_uri"], f["manifest_sha256"], adapter_dir,
                    "" if _is_hub_id(f["base"]) else f["base"]],
        "env": [*_s3_env(f["output"]), {"name": "MODEL_DIR", "value": MODEL_ROOT}],
        "volumeMounts": mounts,
    }
    server = {
        "name": "vllm",
        "image": image,
        "command": ["vllm", "serve"],
        "args": args,
        "ports": [{"name": "http", "containerPort": 8000}],
        "resources": {"limits": {"nvidia.com/gpu": gpus}},
        "readinessProbe": {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 10,
                           "failureThreshold": 60},
        "volumeMounts": mounts,
    }
    annotations = {"training.qlora-operator.dev/qlorajob": f["name"],
                   "training.qlora-operator.dev/adapter-uri": f["adapter_uri"],
                   "training.qlora-operator.dev/manifest-sha256": f["manifest_sha256"]}
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": f["namespace"], "labels": _labels(f["name"]),
                     "annotations": annotations},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": _labels(f["name"])},
            "template": {"metadata": {"labels": _labels(f["name"]), "annotations": annotations},
                         "spec": {"initContainers": [init], "containers": [server], "volumes": volumes,
                                  "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists",
                                                   "effect": "NoSchedule"}]}},
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": f["namespace"], "labels": _labels(f["name"])},
        "spec": {"selector": _labels(f["name"]), "ports": [{"name": "http", "port": 8000, "targetPort": "http"}]},
    }
    return [deployment, service]


def kserve_manifests(job: dict, service_account: str | None = None, gpus: int = 1) -> list[dict]:
    """An InferenceService for KServe's Hugging Face runtime (vLLM backend): its storage initializer
    downloads the adapter folder to /mnt/models, and the base model loads by its hub id."""
    f = serving_facts(job)
    if not _is_hub_id(f["base"]):
        raise ValueError(f"KServe's Hugging Face runtime loads the base by hub id; {f['base']} is not one "
                         "(use --for vllm, which fetches an s3:// base in its init container)")
    args = [f"--model_name={f['name']}", f"--model_id={f['base']}", "--enable-lora",
            f"--lora-modules={f['name']}=/mnt/models", f"--max-lora-rank={max_lora_rank(f['rank'])}"]
    if f["revision"] and not f["revision"].startswith("sha256:"):
        args.append(f"--model_revision={f['revision']}")
    predictor: dict = {
        "model": {
            "modelFormat": {"name": "huggingface"},
            "storageUri": f["adapter_uri"],
            "args": args,
            "resources": {"limits": {"nvidia.com/gpu": str(gpus)}},
        },
    }
    if service_account:
        # KServe reads S3 credentials from a Secret attached to this ServiceAccount (annotated with
        # serving.kserve.io/s3-endpoint for a non-AWS endpoint).
        predictor["serviceAccountName"] = service_account
    return [{
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": {"name": f["name"], "namespace": f["namespace"],
                     "annotations": {"training.qlora-operator.dev/manifest-sha256": f["manifest_sha256"]}},
        "spec": {"predictor": predictor},
    }]


def to_yaml(objects: list[dict]) -> str:
    return yaml.safe_dump_all(json.loads(json.dumps(objects)), sort_keys=False)
