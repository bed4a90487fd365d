"""The `qlora` command's pure parts, no server: manifests from flags, the progress line, the
closing report, the serving manifests."""

from datetime import UTC, datetime, timedelta

import pytest
import yaml
from qlora_api import QLoRAJobSpec
from qlora_cli.describe import describe_lines
from qlora_cli.manifest import build_manifest
from qlora_cli.progress import RateTracker, closing_report, progress_line
from qlora_cli.serving import FETCH_SCRIPT, kserve_manifests, max_lora_rank, vllm_manifests

NOW = datetime(2026, 11, 30, 6, 0, tzinfo=UTC)


def test_flags_land_at_their_spec_paths_and_the_result_is_a_valid_spec():
    flags = {"model": "hf://Qwen/Qwen2.5-0.5B", "dataset": "s3://data/chat.jsonl", "bucket": "adapters",
             "secret": "s3", "rank": 8, "target_modules": ("q_proj", "v_proj"), "max_steps": 30,
             "packing": False, "gpus": 2, "merged_export": True}
    manifest = build_manifest("demo", "team-a", flags, ["training.warmupSteps=5", "spec.lora.dropout=0.1"])
    assert manifest["metadata"] == {"name": "demo", "namespace": "team-a"}
    spec = QLoRAJobSpec.model_validate(manifest["spec"])
    assert spec.lora.r == 8 and spec.lora.target_modules == ["q_proj", "v_proj"] and spec.lora.dropout == 0.1
    assert spec.training.max_steps == 30 and spec.training.packing is False and spec.training.warmup_steps == 5
    assert spec.output.credentials_secret_ref.name == "s3" and spec.output.merged_export is True
    assert spec.resources.gpu.count == 2


def test_flags_override_a_file_and_keep_the_rest():
    base = yaml.safe_load("""
kind: QLoRAJob
metadata: {name: from-file}
spec:
  model: {uri: hf://a/b}
  dataset: {uri: s3://d/x.jsonl}
  output: {bucket: out}
  lora: {r: 32, alpha: 64}
""")
    manifest = build_manifest(None, "ns", {"rank": 4}, [], base)
    assert manifest["metadata"]["name"] == "from-file"
    assert manifest["spec"]["lora"] == {"r": 4, "alpha": 64}
    assert manifest["apiVersion"] == "training.qlora-operator.dev/v1alpha1"


def running_status(step=12, total=40, **progress):
    return {
        "phase": "Running",
        "conditions": [{"type": "Running", "status": "True", "reason": "Training", "message": "training"}],
        "progress": {"step": step, "totalSteps": total, "loss": 0.41234567, "tokensPerSecond": 1530.2,
                     **progress},
    }


def test_progress_line_shows_step_of_total_loss_rate_eta_and_condition():
    status = running_status(etaSeconds=100, updatedAt=(NOW - timedelta(seconds=30)).isoformat())
    line = progress_line(status, NOW)
    assert "12/40  30%" in line and "loss 0.4123" in line and "1,530 tok/s" in line
    assert "ETA 1:10" in line  # the trainer's 100 s, 30 s ago
    assert line.endswith("Running (Training)")
    assert line.count("█") == round(0.3 * 24)


def test_eta_from_the_watchers_own_step_rate_when_the_trainer_reports_none():
    rates = RateTracker()
    rates.add(0.0, 10)
    rates.add(5.0, 20)  # 2 steps/s, 20 steps to go
    assert "ETA 0:10" in progress_line(running_status(step=20), NOW, rates)


def test_unschedulable_shows_as_the_current_condition():
    status = {"phase": "Pending", "conditions": [
        {"type": "Scheduled", "status": "False", "reason": "Unschedulable", "message": "0/1 nodes"}]}
    assert progress_line(status, NOW).endswith("Pending: Unschedulable")


def test_failure_report_carries_reason_message_and_hint():
    job = {"metadata": {"name": "j"}, "status": {"phase": "Failed", "conditions": [
        {"type": "Failed", "status": "True", "reason": "OOMKilled", "message": "over 4Gi"}]}}
    ok, lines = closing_report(job)
    assert not ok and lines[0] == "Failed: j: OOMKilled" and "over 4Gi" in lines[1]
    assert "raise resources.memory" in lines[2]
    job["status"]["conditions"][0].update(reason="CudaOutOfMemory", message="CUDA out of memory. Hint: lower it")
    assert closing_report(job)[1][-1] == "  hint: lower it"  # the trainer's own hint wins


def test_success_report_names_the_adapter_and_the_eval_losses():
    job = {"metadata": {"name": "j"}, "status": {"phase": "Succeeded", "result": {
        "adapterUri": "s3://b/p/", "evalLossBefore": 6.91234, "evalLossAfter": 0.1234, "totalBytes": 2_500_000,
        "files": [{}, {}], "manifestSha256": "ab" * 32, "trainSeconds": 75}}}
    ok, lines = closing_report(job)
    assert ok and "s3://b/p/" in lines[1] and "6.912 -> 0.1234" in lines[2] and "2 (2.5 MB)" in lines[3]


def published_job(base="hf://Qwen/Qwen2.5-0.5B-Instruct", rank=12, revision="abc123"):
    return {"metadata": {"name": "bot", "namespace": "ml"},
            "spec": {"model": {"uri": base}, "output": {"bucket": "adapters", "endpointUrl": "http://minio:9000",
                                                        "credentialsSecretRef": {"name": "s3"}}},
            "status": {"phase": "Succeeded", "result": {
                "adapterUri": "s3://adapters/a/ml/bot/uid/", "manifestSha256": "f" * 64, "loraRank": rank,
                "baseModel": base.removeprefix("hf://") if base.startswith("hf://") else base,
                "baseModelRevision": revision}}}


def test_vllm_deployment_serves_the_hub_base_with_the_verified_adapter():
    deployment, service = vllm_manifests(published_job())
    pod = deployment["spec"]["template"]["spec"]
    server, init = pod["containers"][0], pod["initContainers"][0]
    assert server["args"][:4] == ["Qwen/Qwen2.5-0.5B-Instruct", "--enable-lora", "--lora-modules", "bot=/adapters/bot"]
    assert server["args"][server["args"].index("--max-lora-rank") + 1] == "16"  # 12 rounds up to vLLM's 16
    assert server["args"][-2:] == ["--revision", "abc123"]
    assert init["command"][:3] == ["python", "-c", FETCH_SCRIPT]
    assert init["command"][3:6] == ["s3://adapters/a/ml/bot/uid/", "f" * 64, "/adapters/bot"]
    env = {e["name"]: e for e in init["env"]}
    assert env["S3_ENDPOINT"]["value"] == "http://minio:9000"
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"] == {"name": "s3", "key": "AWS_ACCESS_KEY_ID"}
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]


def test_vllm_fetches_an_s3_base_into_the_pod_and_kserve_refuses_it():
    deployment, _ = vllm_manifests(published_job(base="s3://models/llama/", revision="sha256:0123"))
    server = deployment["spec"]["template"]["spec"]["containers"][0]
    assert server["args"][0] == "/models" and "--revision" not in server["args"]
    assert deployment["spec"]["template"]["spec"]["initContainers"][0]["command"][-1] == "s3://models/llama/"
    with pytest.raises(ValueError, match="hub id"):
        kserve_manifests(published_job(base="s3://models/llama/"))


def test_kserve_inference_service_uses_the_hugging_face_runtime_with_lora():
    (isvc,) = kserve_manifests(published_job(), service_account="s3-reader")
    model = isvc["spec"]["predictor"]["model"]
    assert model["modelFormat"] == {"name": "huggingface"} and model["storageUri"] == "s3://adapters/a/ml/bot/uid/"
    assert "--model_id=Qwen/Qwen2.5-0.5B-Instruct" in model["args"] and "--enable-lora" in model["args"]
    assert "--lora-modules=bot=/mnt/models" in model["args"]
    assert isvc["spec"]["predictor"]["serviceAccountName"] == "s3-reader"


@pytest.mark.parametrize(("rank", "expected"), [(1, 1), (2, 8), (16, 16), (17, 32), (300, 320)])
def test_max_lora_rank_is_the_smallest_vllm_accepts(rank, expected):
    assert max_lora_rank(rank) == expected


def test_describe_shows_the_checkpoint_a_preempted_pod_would_resume_from():
    job = {"metadata": {"name": "demo", "namespace": "team-a"}, "spec": {"model": {"uri": "hf://m"}},
           "status": {"phase": "Running", "attempts": 1, "progress": {
               "step": 12, "summary": "12/30 (40%)", "checkpointStep": 9, "resumedFromStep": 8,
               "checkpointUri": "s3://adapters/runs/team-a/demo/u1/checkpoints/step-9/"}}}
    lines = describe_lines(job, [])
    assert ("Checkpoint:  step 9 (s3://adapters/runs/team-a/demo/u1/checkpoints/step-9/); this pod resumed from "
            "step 8") in lines
    del job["status"]["progress"]["checkpointStep"]
    assert not any(line.startswith("Checkpoint:") for line in describe_lines(job, []))
