"""What the trainer publishes for servers, no S3: adapter_config.json names a base a server can
resolve, the result carries rank and module names, and the termination message keeps them."""

import hashlib
import json

from qlora_api import PublishedFile, TrainingResult
from qlora_trainer import publishing, reporting


def test_adapter_config_names_the_spec_model_instead_of_the_scratch_folder(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({
        "base_model_name_or_path": "/tmp/qlora-abc/model", "r": 16, "lora_alpha": 32,
        "target_modules": ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj",
                           "model.layers.0.mlp.down_proj"]}))
    hub = publishing.server_model_name("hf://Qwen/Qwen2.5-0.5B")
    config = publishing.point_adapter_at_base(tmp_path, hub, "7ae557604adf67be50417f59c2c2f167def9a775")
    assert hub == "Qwen/Qwen2.5-0.5B"
    assert json.loads((tmp_path / "adapter_config.json").read_text()) == config
    assert config["base_model_name_or_path"] == "Qwen/Qwen2.5-0.5B"
    assert config["revision"] == "7ae557604adf67be50417f59c2c2f167def9a775"
    assert publishing.adapter_facts(config) == {"lora_rank": 16, "lora_alpha": 32,
                                                "target_modules": ["down_proj", "q_proj"]}
    s3_base = publishing.point_adapter_at_base(tmp_path, publishing.server_model_name("s3://m/llama/"), "sha256:00ff")
    assert s3_base["base_model_name_or_path"] == "s3://m/llama/"
    assert s3_base["revision"] is None  # a content fingerprint is no revision a server could ask for


def test_the_merged_export_gets_its_own_manifest(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    digest = publishing.write_merged_manifest(tmp_path)
    assert hashlib.sha256((tmp_path / "manifest.json").read_bytes()).hexdigest() == digest
    listed = json.loads((tmp_path / "manifest.json").read_text())["files"]
    assert [f["path"] for f in listed] == ["config.json", "model.safetensors"]
    assert listed[1]["sha256"] == hashlib.sha256(b"weights").hexdigest()


def test_the_termination_message_keeps_the_serving_facts_when_it_must_shrink():
    files = [PublishedFile(path=f"merged/model-{i:05d}-of-00200.safetensors", size=i, sha256="a" * 64)
             for i in range(200)]
    result = TrainingResult(adapter_uri="s3://b/p/", manifest_sha256="b" * 64, files=files,
                            base_model="Qwen/Qwen2.5-7B", base_model_revision="abc", lora_rank=16, lora_alpha=32,
                            target_modules=["k_proj", "q_proj"], merged_model_manifest_sha256="c" * 64,
                            train_seconds=1.0, perplexity_before=3.0)
    text = reporting.result_message(result)
    assert len(text.encode()) <= 4096
    kept = json.loads(text)["result"]
    assert kept["baseModel"] == "Qwen/Qwen2.5-7B" and kept["loraRank"] == 16
    assert kept["targetModules"] == ["k_proj", "q_proj"] and kept["mergedModelManifestSha256"] == "c" * 64
