"""The API models: defaults, validation messages, the trainer/operator protocol, the CRD generator."""

import json

import pytest
import yaml
from pydantic import ValidationError
from qlora_api import ExitCode, QLoRAJobSpec, TrainerProgressLine, TrainerRunConfig
from qlora_api.crd import CRD_PATH, render_crd
from qlora_api.crd import main as crd_main
from qlora_api.protocol import TrainerError, TrainerResultMessage, parse_termination_message

MINIMAL = {
    "model": {"uri": "s3://models/smollm2-135m/"},
    "dataset": {"uri": "s3://datasets/chat.jsonl"},
    "output": {"bucket": "adapters"},
}


def spec(**overrides) -> QLoRAJobSpec:
    data = json.loads(json.dumps(MINIMAL))
    for path, value in overrides.items():
        node = data
        *parents, leaf = path.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return QLoRAJobSpec.model_validate(data)


def test_defaults_are_the_qlora_papers():
    s = spec()
    assert (s.quantization.quant_type, s.quantization.double_quant) == ("nf4", True)
    assert s.training.optimizer == "paged_adamw_32bit"
    assert s.training.max_grad_norm == 0.3
    assert s.lora.target_modules == ["all-linear"]


def test_wire_format_is_camel_case_and_round_trips():
    wire = spec(**{"training.maxSteps": 30}).to_wire()
    assert wire["training"]["maxSteps"] == 30 and "max_steps" not in wire["training"]
    assert QLoRAJobSpec.model_validate(wire) == spec(**{"training.maxSteps": 30})


@pytest.mark.parametrize(
    "path,value,fragment",
    [
        ("model.uri", "ftp://somewhere/model", "string should match pattern"),
        ("model.revision", "main", "revision applies only to hf:// models"),
        ("lora.r", 0, "greater than or equal to 1"),
        ("lora.targetModules", ["all-linear", "q_proj"], "all-linear cannot be combined"),
        ("training.warmupSteps", 10, None),
        ("quantization.quantType", "int3", "'nf4' or 'fp4'"),
        ("output.bucket", "Not_A_Bucket", "string should match pattern"),
        ("training.bogus", 1, "extra inputs are not permitted"),
        ("resources.memory", "lots", "string should match pattern"),
    ],
)
def test_invalid_specs_are_refused_with_a_specific_message(path, value, fragment):
    if fragment is None:  # warmupSteps alone is fine; with warmupRatio it is not
        assert spec(**{path: value}).training.warmup_steps == value
        with pytest.raises(ValidationError, match="warmupRatio or warmupSteps, not both"):
            spec(**{path: value, "training.warmupRatio": 0.1})
        return
    with pytest.raises(ValidationError) as err:
        spec(**{path: value})
    assert fragment.lower() in str(err.value).lower()


def test_hf_model_with_revision_is_accepted():
    assert spec(**{"model.uri": "hf://HuggingFaceTB/SmolLM2-135M-Instruct", "model.revision": "main"})


def test_progress_line_parsing_ignores_human_logs_and_other_events():
    line = TrainerProgressLine(step=3, total_steps=10, loss=1.5).model_dump_json(by_alias=True, exclude_none=True)
    parsed = TrainerProgressLine.parse(line)
    assert parsed is not None and (parsed.step, parsed.total_steps, parsed.loss) == (3, 10, 1.5)
    assert TrainerProgressLine.parse("step 3 loss 1.5") is None
    assert TrainerProgressLine.parse('{"event": "other", "progress": 1}') is None
    assert TrainerProgressLine.parse('{"event": "progress", "step": -1}') is None


def test_progress_line_of_a_newer_trainer_keeps_what_this_operator_knows():
    line = '{"event": "progress", "step": 7, "checkpointStep": 5, "resumedFromStep": 5, "someFutureField": 1}'
    parsed = TrainerProgressLine.parse(line)
    assert parsed is not None and (parsed.step, parsed.checkpoint_step, parsed.resumed_from_step) == (7, 5, 5)


def test_termination_messages_parse_to_result_or_error():
    ok = TrainerResultMessage.model_validate({"result": {"adapterUri": "s3://b/p/"}})
    assert parse_termination_message(ok.model_dump_json(by_alias=True)).result.adapter_uri == "s3://b/p/"
    err = TrainerError(reason="BadData", message="train.jsonl line 7: not JSON", exit_code=3)
    assert parse_termination_message(err.model_dump_json(by_alias=True)).reason == "BadData"
    assert parse_termination_message("Traceback (most recent call last):") is None
    assert parse_termination_message("") is None


def test_exit_codes_say_what_a_retry_can_fix():
    assert ExitCode.STORAGE_UNAVAILABLE.retryable and ExitCode.INTERRUPTED.retryable
    assert not ExitCode.BAD_DATA.retryable and not ExitCode.OUT_OF_MEMORY.retryable


def test_run_config_carries_the_spec():
    cfg = TrainerRunConfig(namespace="ml", name="j", run_id="uid-1", spec=spec())
    assert TrainerRunConfig.model_validate_json(cfg.model_dump_json(by_alias=True)).spec == spec()


def test_checked_in_crds_match_the_models():
    assert crd_main(["--check"]) == 0, "run `make crds`"
    assert yaml.safe_load(CRD_PATH.read_text()) == render_crd()


def test_crd_schema_is_structural_and_validating():
    text = json.dumps(render_crd())
    for forbidden in ('"$ref"', '"anyOf"', '"title"', '"$defs"'):
        assert forbidden not in text
    version = render_crd()["spec"]["versions"][0]
    spec_schema = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert "x-kubernetes-preserve-unknown-fields" not in spec_schema
    assert spec_schema["properties"]["lora"]["properties"]["r"]["default"] == 16
    assert version["subresources"] == {"status": {}}
    rules = [r["rule"] for r in spec_schema["properties"]["lora"]["x-kubernetes-validations"]]
    assert "self == oldSelf" in rules and any("all-linear" in r for r in rules)
    conditions = version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]["conditions"]
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]


@pytest.mark.parametrize("path", sorted(CRD_PATH.parents[1].glob("samples/*.yaml")), ids=lambda p: p.name)
def test_samples_are_valid_qlorajobs(path):
    doc = yaml.safe_load(path.read_text())
    assert doc["kind"] == "QLoRAJob"
    assert QLoRAJobSpec.model_validate(doc["spec"]).output.bucket


def test_readme_field_reference_is_generated_from_the_models():
    from qlora_api.field_reference import README, updated_readme

    text = README.read_text()
    assert updated_readme(text) == text, "run `make crds`"
    assert "| `spec.lora.r` |" in text and "`16`" in text
