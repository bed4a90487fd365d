"""A real adapter in the user's hands: the trainer (the real CLI, as the pod runs it) fine-tunes the
suite's tiny Llama from the cluster's MinIO and publishes there; the QLoRAJob's status holds its
result as the operator writes it. Then, as a user: `qlora fetch` (adapter and merged export, each
verified against its own manifest), the adapter checked the way vLLM loads LoRA adapters, `qlora
eval` reproducing the trainer's eval losses with peft, and `qlora try` side by side.

    .venv/bin/pytest tests/test_cli_trained_adapter.py      # about a minute on 2 CPU cores
"""

import hashlib
import json
import uuid

import pytest
from qlora_localcluster.testing import kubectl
from support.cli import qlora, s3_env
from support.operator_process import install_crd_and_rbac
from support.published import ensure_bucket, minio, succeeded_job
from support.vllm_lora_rules import vllm_load_problems
from trainer_fixtures.runs import TrainerProcess, jsonl, trainer_env
from trainer_fixtures.tiny_model import build_model, chat_records

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
MODELS, DATA, ADAPTERS = "cli-models", "cli-data", "cli-adapters"
LLAMA_LINEAR = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


@pytest.fixture(scope="module")
def trained(local_cluster, tmp_path_factory):
    install_crd_and_rbac(local_cluster)
    s3 = minio(local_cluster)
    for bucket in (MODELS, DATA, ADAPTERS):
        ensure_bucket(s3, bucket)
    base = tmp_path_factory.mktemp("tiny-base")
    build_model(base)
    for path in base.iterdir():
        s3.upload_file(str(path), MODELS, f"tiny-llama/{path.name}")
    eval_file = tmp_path_factory.mktemp("data") / "eval.jsonl"
    eval_file.write_bytes(jsonl(chat_records(40, seed=2)))
    s3.put_object(Bucket=DATA, Key="colours/train.jsonl", Body=jsonl(chat_records(240, seed=1)))
    s3.upload_file(str(eval_file), DATA, "colours/eval.jsonl")

    namespace = f"t-cli-trained-{uuid.uuid4().hex[:5]}"
    kubectl(local_cluster, "create", "namespace", namespace)
    spec = {
        "model": {"uri": f"s3://{MODELS}/tiny-llama/"},
        "dataset": {"uri": f"s3://{DATA}/colours/train.jsonl", "evalUri": f"s3://{DATA}/colours/eval.jsonl"},
        "quantization": {"computeDtype": "float32"},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "training": {"maxSteps": 30, "learningRate": 0.01, "batchSize": 8, "gradientAccumulationSteps": 1,
                     "maxSeqLength": 64, "packing": False, "gradientCheckpointing": False, "loggingSteps": 10,
                     "checkpointSteps": 0, "warmupSteps": 2},
        "output": {"bucket": ADAPTERS, "prefix": "runs", "endpointUrl": local_cluster.s3_endpoint,
                   "addressingStyle": "path", "mergedExport": True},
    }
    config = {"namespace": namespace, "name": "colours", "runId": uuid.uuid4().hex, "spec": spec}
    proc = TrainerProcess(tmp_path_factory.mktemp("trainer"), config,
                          trainer_env(None, **s3_env(local_cluster), AWS_DEFAULT_REGION="us-east-1"))
    assert proc.wait(600) == 0, proc.log_tail()
    result = proc.termination.result.to_wire()
    job = succeeded_job(local_cluster, namespace, "colours", spec, result)
    yield {"job": job, "result": result, "base": base, "eval_file": eval_file, "namespace": namespace}
    kubectl(local_cluster, "delete", "namespace", namespace, "--wait=false", check=False)


def test_the_status_says_what_a_server_needs(trained):
    result = trained["job"]["status"]["result"]
    assert result["baseModel"] == f"s3://{MODELS}/tiny-llama/"
    assert result["baseModelRevision"].startswith("sha256:")
    assert (result["loraRank"], result["loraAlpha"]) == (8, 16)
    assert result["targetModules"] == LLAMA_LINEAR  # all-linear as resolved in the model
    assert result["mergedModelManifestUri"] == result["adapterUri"] + "merged/manifest.json"


def test_fetched_adapter_names_its_base_and_loads_the_way_vllm_loads_adapters(local_cluster, trained, tmp_path):
    out = qlora(local_cluster, "-n", trained["namespace"], "fetch", "colours", str(tmp_path), env=s3_env(local_cluster))
    assert out.returncode == 0, out.stderr
    assert not (tmp_path / "merged").exists()  # the merged model only with --merged
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == f"s3://{MODELS}/tiny-llama/"  # not the pod's scratch folder
    assert vllm_load_problems(tmp_path, trained["base"], max_lora_rank=8) == []
    # The rules bite: the same adapter as DoRA, or over the server's rank limit, would be refused.
    assert vllm_load_problems(tmp_path, trained["base"], max_lora_rank=1) == ["rank 8 over --max-lora-rank 1"]
    config["use_dora"] = True
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    assert vllm_load_problems(tmp_path, trained["base"], max_lora_rank=8) == ["DoRA adapters are not supported"]


def test_fetch_merged_verifies_the_merged_model_against_its_own_manifest(local_cluster, trained, tmp_path):
    out = qlora(local_cluster, "-n", trained["namespace"], "fetch", "colours", str(tmp_path), "--merged",
                env=s3_env(local_cluster))
    assert out.returncode == 0, out.stderr
    merged_manifest = (tmp_path / "merged" / "manifest.json").read_bytes()
    assert hashlib.sha256(merged_manifest).hexdigest() == trained["result"]["mergedModelManifestSha256"]
    listed = json.loads(merged_manifest)["files"]
    assert {"config.json", "model.safetensors"} <= {f["path"] for f in listed}
    for entry in listed:
        assert hashlib.sha256((tmp_path / "merged" / entry["path"]).read_bytes()).hexdigest() == entry["sha256"]


def test_eval_with_peft_reproduces_the_trainers_eval_losses(local_cluster, trained):
    out = qlora(local_cluster, "-n", trained["namespace"], "eval", "colours", "--file", str(trained["eval_file"]),
                env=s3_env(local_cluster), timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    before = float(lines[1].split("eval loss ")[1].split()[0])
    after = float(lines[2].split("eval loss ")[1].split()[0])
    result = trained["result"]
    assert before == pytest.approx(result["evalLossBefore"], abs=2e-4), (before, result)
    assert after == pytest.approx(result["evalLossAfter"], abs=2e-4), (after, result)
    assert after < 0.5 * before


def test_try_prints_the_base_and_the_adapted_reply_side_by_side(local_cluster, trained):
    out = qlora(local_cluster, "-n", trained["namespace"], "try", "colours", "--prompt", "what colour is the sky",
                "--max-new-tokens", "6", env=s3_env(local_cluster), timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "prompt: what colour is the sky"
    left, right = (part.strip() for part in lines[1].split(" | "))
    assert (left, right) == ("base", "with colours")
    base_reply, adapted_reply = (part.strip() for part in lines[3].split(" | "))
    # 30 steps teach the reply's form ("the <thing> is <colour>") before the colours: it opens as taught.
    assert adapted_reply.split()[0] == "the", out.stdout
    assert base_reply.split()[0] != "the" and base_reply != adapted_reply
