"""The trainer end to end on the CPU: the real CLI in a subprocess fine-tunes a tiny Llama from an
s3:// model folder on a learnable chat task, publishes to a real S3 server over HTTP, and the
published adapter is downloaded and loaded again with peft on a 4-bit and on a plain base."""

import hashlib
import json

import pytest
import torch
from qlora_api import TrainerProgressLine, TrainerResultMessage
from trainer_fixtures.fixtures import colour_data, s3, tiny_model_dir, tiny_model_uri  # noqa: F401
from trainer_fixtures.runs import run_config, run_trainer, trainer_env

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(s3, tiny_model_uri, colour_data, tmp_path_factory):  # noqa: F811
    """One real run, shared by the assertions below."""
    config = run_config(s3, tiny_model_uri, colour_data["train"], "run-e2e", eval_uri=colour_data["eval"],
                        training={"evalSteps": 20}, output={"mergedExport": True})
    proc = run_trainer(tmp_path_factory.mktemp("e2e"), config, trainer_env(s3))
    assert proc.proc.returncode == 0, proc.log_tail()
    return proc


def _published(s3, key_prefix: str) -> dict[str, bytes]:  # noqa: F811
    return {k[len(key_prefix):]: s3.get("adapters", k) for k in s3.keys("adapters", key_prefix)}


def test_result_reports_a_lower_eval_loss_in_the_termination_message(trained):
    message = trained.termination
    assert isinstance(message, TrainerResultMessage)
    result = message.result
    assert result.adapter_uri == "s3://adapters/adapters/team-a/colours/run-e2e/"
    assert result.eval_loss_after < 0.5 * result.eval_loss_before, result
    assert result.perplexity_after == pytest.approx(torch.tensor(result.eval_loss_after).exp().item(), rel=1e-4)
    assert result.resumed_from_step is None
    assert result.base_model_revision.startswith("sha256:")
    assert result.merged_model_uri == result.adapter_uri + "merged/"
    assert len(trained.termination_text.encode()) <= 4096


def test_stdout_holds_only_progress_lines_at_the_logging_steps(trained):
    assert trained.stdout_reports, "no progress reported"
    for line in trained.stdout_reports:  # exactly TrainerProgressLine JSON, nothing else but phase lines
        parsed = TrainerProgressLine.parse(line)
        assert parsed is not None, line
        assert line == parsed.model_dump_json(by_alias=True, exclude_none=True)
    progress = trained.progress
    assert [p.step for p in progress] == list(range(5, 41, 5))
    assert all(p.total_steps == 40 for p in progress)
    assert progress[3].summary == "20/40 (50%)"
    assert progress[-1].eta_seconds == 0
    assert all(p.loss is not None and p.learning_rate is not None and p.tokens_per_second > 0 for p in progress)
    assert progress[-1].loss < progress[0].loss
    # evalSteps=20: the eval loss appears from the first report after step 20 on.
    assert progress[3].eval_loss is not None and progress[2].eval_loss is None


def test_manifest_is_written_last_and_matches_every_object(trained, s3):  # noqa: F811
    result = trained.termination.result
    prefix = "adapters/team-a/colours/run-e2e/"
    objects = _published(s3, prefix)
    manifest_bytes = objects.pop("manifest.json")
    assert hashlib.sha256(manifest_bytes).hexdigest() == result.manifest_sha256
    manifest = json.loads(manifest_bytes)
    listed = {f["path"]: f for f in manifest["files"]}
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "training_config.json", "metrics.json", "merged/config.json", "merged/model.safetensors"):
        assert name in listed, name
    # Beside the publication: resumable checkpoints, and the claim that made this trainer its only publisher.
    assert json.loads(objects["publish-claim.json"])["attempt"] == 1
    published = {k: v for k, v in objects.items() if not k.startswith("checkpoints/") and k != "publish-claim.json"}
    assert set(published) == set(listed)
    for name, body in published.items():
        assert listed[name]["size"] == len(body)
        assert listed[name]["sha256"] == hashlib.sha256(body).hexdigest(), name
    assert {f.path for f in result.files} == set(listed)
    # Written last: nothing of the run is newer than the manifest.
    client = s3.client()
    stamp = {o["Key"]: o["LastModified"] for o in client.list_objects_v2(Bucket="adapters", Prefix=prefix)["Contents"]}
    assert stamp[prefix + "manifest.json"] == max(stamp.values())
    config = json.loads(objects["training_config.json"])
    assert config["run"]["spec"]["training"]["maxSteps"] == 40
    assert config["resolved"]["computeDtype"] == "float32"  # auto on a CPU
    # No memory plan on a CPU: the batch as configured is what ran.
    spec_training = config["run"]["spec"]["training"]
    assert config["resolved"]["memoryPlan"] is None
    assert config["resolved"]["acceleration"]["path"] == "plain"  # the spec asked for fused: no plan on a CPU
    assert config["resolved"]["batchSize"] == spec_training["batchSize"]
    assert config["resolved"]["gradientAccumulationSteps"] == spec_training["gradientAccumulationSteps"]


def test_phases_account_for_the_run_in_stdout_and_training_config(trained, s3, tiny_model_dir,  # noqa: F811
                                                                  colour_data):  # noqa: F811
    prefix = "adapters/team-a/colours/run-e2e/"
    phases = json.loads(s3.get("adapters", prefix + "training_config.json"))["phases"]
    metrics = json.loads(s3.get("adapters", prefix + "metrics.json"))
    by = phases["byPhase"]
    # the training libraries import on a thread from the start: "startup" is what the storage check
    # and the data download did not hide (startup_thread.py)
    assert phases["order"] == ["checkStorage", "downloadData", "startup", "downloadModel", "loadTokenizer",
                               "tokenize", "planMemory", "fromPretrained", "prepareKbit", "quantize", "prepareAdapter", "restoreCheckpoint", "buildTrainer", "evalBefore",
                               "evalDuring", "checkpointUpload", "train", "evalAfter", "saveAdapter",
                               "exportMerged", "publish"]
    assert all(p["seconds"] > 0 for p in by.values()), by
    # The top-level phases cover the trainer's own clock (from before its imports to the upload) with
    # no gap worth naming; outside that clock only the interpreter's start and exit, reading the
    # config and the last small writes (config, metrics, manifest, termination message) remain: a
    # fixed second or two, whatever the run's length (a share of the process's wall time would
    # pass or fail with the machine's load).
    top = sum(p["seconds"] for p in by.values() if "inside" not in p)
    assert top == pytest.approx(phases["topLevelSeconds"], abs=1e-3)
    assert 0.97 * phases["wallSeconds"] < top <= phases["wallSeconds"] + 1e-3, (top, phases["wallSeconds"])
    assert 0 < trained.wall_seconds - phases["wallSeconds"] < 5.0, (trained.wall_seconds, phases["wallSeconds"])
    # Checkpoints at steps 20 and 40 and evaluations at 20 and 40 happen inside the training phase.
    assert by["checkpointUpload"]["inside"] == by["evalDuring"]["inside"] == "train"
    assert by["checkpointUpload"]["count"] == by["evalDuring"]["count"] == 2
    assert by["checkpointUpload"]["seconds"] + by["evalDuring"]["seconds"] < by["train"]["seconds"]
    # Quantities and rates are the run's own (the model's bytes: the files the trainer downloads).
    from qlora_trainer.model_loading import _MODEL_FILE_SUFFIXES

    model_bytes = sum(p.stat().st_size for p in tiny_model_dir.iterdir() if p.name.endswith(_MODEL_FILE_SUFFIXES))
    assert by["downloadModel"]["bytes"] == model_bytes
    assert by["downloadModel"]["megabytesPerSecond"] == pytest.approx(
        model_bytes / 1e6 / by["downloadModel"]["seconds"], rel=0.01)
    data_bytes = sum(len(s3.get("datasets", f"colours/{n}.jsonl")) for n in ("train", "eval"))
    assert by["downloadData"]["bytes"] == data_bytes
    assert by["quantize"]["params"] > 0 and by["quantize"]["paramsPerSecond"] > 0
    # The quantize phase's steps, nested in it.
    assert by["fromPretrained"]["inside"] == by["prepareKbit"]["inside"] == "quantize"
    assert by["fromPretrained"]["seconds"] + by["prepareKbit"]["seconds"] <= by["quantize"]["seconds"]
    assert by["fromPretrained"]["params"] == by["quantize"]["params"]
    assert 0 < by["prepareKbit"]["params"] < by["quantize"]["params"]  # the frozen floats (fp32 after it), not the 4-bit weights
    assert by["train"]["tokens"] == metrics["train_tokens_this_attempt"]
    published = {f.path: f.size for f in trained.termination.result.files}
    assert by["publish"]["bytes"] == sum(size for path, size in published.items()
                                         if path not in ("training_config.json", "metrics.json"))
    # The whole eval split is under the default bound: every row is scored, before and after.
    assert by["evalBefore"]["rows"] == by["evalAfter"]["rows"] == metrics["eval_rows"] == metrics["eval_rows_scored"]
    # stdout: one valid phase line per phase as it ended, nested ones each time they ran.
    lines = [line for line in trained.stdout if line not in trained.stdout_reports]
    assert [p.phase for p in trained.phases].count("checkpointUpload") == 2
    assert {p.phase for p in trained.phases} == set(by)
    for line, parsed in zip(lines, trained.phases):
        assert line == parsed.model_dump_json(by_alias=True, exclude_none=True)
    assert sum(1 for line in trained.stderr if " phase " in line) == len(trained.phases)


def _download(s3, prefix, dest):  # noqa: F811
    for key in s3.keys("adapters", prefix):
        path = dest / key[len(prefix):]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(s3.get("adapters", key))
    return dest


def _eval_loss(model, tokenizer, records):
    from qlora_api.spec import TrainingSpec
    from qlora_trainer import data, evaluation

    spec = TrainingSpec(maxSeqLength=64)
    rows = data.build_examples([data.Record(f"eval line {i}", "messages", r) for i, r in enumerate(records)],
                               tokenizer, spec, "eval")
    return evaluation.eval_loss(model, rows, data.Collator(tokenizer.pad_token_id, packed=True), 8)


def test_published_adapter_loads_on_4bit_and_plain_base_and_beats_the_base(trained, s3, tiny_model_dir,  # noqa: F811
                                                                              colour_data, tmp_path):  # noqa: F811
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    adapter = _download(s3, "adapters/team-a/colours/run-e2e/", tmp_path / "adapter")
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    records = colour_data["eval_records"]
    result = trained.termination.result

    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    base_loss = _eval_loss(plain, tokenizer, records)
    tuned_loss = _eval_loss(PeftModel.from_pretrained(plain, adapter), tokenizer, records)
    assert tuned_loss < 0.6 * base_loss, (base_loss, tuned_loss)

    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32)
    quantized = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=nf4, device_map="cpu")
    quantized_base_loss = _eval_loss(quantized, tokenizer, records)
    tuned_4bit_loss = _eval_loss(PeftModel.from_pretrained(quantized, adapter), tokenizer, records)
    assert tuned_4bit_loss < 0.6 * quantized_base_loss
    # The same adapter the trainer evaluated: its own after-training number comes back.
    assert tuned_4bit_loss == pytest.approx(result.eval_loss_after, rel=1e-3)
    assert quantized_base_loss == pytest.approx(result.eval_loss_before, rel=1e-3)

    merged = AutoModelForCausalLM.from_pretrained(adapter / "merged", dtype=torch.float32)
    merged_loss = _eval_loss(merged, tokenizer, records)
    assert merged_loss == pytest.approx(tuned_loss, rel=0.05)  # bf16 rounding of the merged weights


def test_a_rerun_of_a_published_run_reports_it_without_training(trained, s3, tiny_model_uri, colour_data,  # noqa: F811
                                                                 tmp_path):
    config = json.loads(trained.config_path.read_text())
    again = run_trainer(tmp_path, config, trainer_env(s3))
    assert again.proc.returncode == 0, again.log_tail()
    assert again.stdout_reports == []  # no training happened
    assert [p.phase for p in again.phases] == ["checkStorage"]  # it never waits for torch & co.
    assert again.termination.result.manifest_sha256 == trained.termination.result.manifest_sha256
    assert any("already published" in line for line in again.stderr)


def test_the_fast_path_trains_through_the_real_trainer(s3, tiny_model_uri, colour_data, tmp_path):  # noqa: F811
    """The GPU default path's wiring (memory plan, fused decoder layers with LoRA dropout, packed
    rows, chunked cross-entropy) through the real Trainer, on the CPU's torch references
    (QLORA_ACCELERATION=cpu): the run succeeds, learns, and records the plan it ran."""
    config = run_config(s3, tiny_model_uri, colour_data["train"], "run-fast", eval_uri=colour_data["eval"],
                        lora={"dropout": 0.05})
    proc = run_trainer(tmp_path, config, trainer_env(s3, QLORA_ACCELERATION="cpu"))
    assert proc.proc.returncode == 0, proc.log_tail()
    log = proc.log_tail(100_000)
    assert "fused decoder layers" in log and " 0 fused decoder layers" not in log, log[-3000:]
    result = proc.termination.result
    assert result.eval_loss_after < 0.5 * result.eval_loss_before, result
    # The training forward must see every optimizer step too: a fast path that kept the first
    # step's adapter reported a flat training loss while the eval loss (plain forward) fell.
    train = [p.loss for p in map(TrainerProgressLine.parse, proc.stdout) if p is not None and p.loss is not None]
    assert len(train) >= 3 and train[-1] < 0.5 * train[0], train
    ran = json.loads(s3.get("adapters", "adapters/team-a/colours/run-fast/training_config.json"))
    assert "micro-batch" in json.dumps(ran), ran
    assert ran["resolved"]["acceleration"] == {"path": "fused", "cudaGraphs": True, "memory": "auto",
                                               "why": "spec.training.acceleration"}, ran["resolved"]
