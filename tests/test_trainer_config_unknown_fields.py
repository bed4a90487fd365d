"""An older trainer image run by a newer operator: the config may carry spec fields this trainer does
not know. They are dropped with one warning that names them; a known field of the wrong type is
still refused with its wire path."""

import json
import logging

import pytest
from qlora_api import ExitCode
from qlora_trainer.config import load_run_config
from qlora_trainer.errors import TrainerFailure


def config(**training) -> dict:
    return {
        "namespace": "team-a", "name": "colours", "runId": "run-1",
        "spec": {
            "model": {"uri": "s3://models/tiny/"},
            "dataset": {"uri": "s3://datasets/train.jsonl"},
            "output": {"bucket": "adapters"},
            "training": {"maxSteps": 3, **training},
        },
    }


def write(tmp_path, data: dict):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    return path


def test_fields_a_newer_operator_added_are_ignored_with_one_warning_naming_them(tmp_path, caplog):
    data = config(futureScheduler={"kind": "wsd"}, batchSize=4)
    data["spec"]["model"]["futureKnob"] = True
    data["spec"]["newSection"] = {"a": 1}
    data["priority"] = "high"
    with caplog.at_level(logging.WARNING, logger="qlora_trainer"):
        cfg = load_run_config(write(tmp_path, data))
    assert (cfg.spec.training.max_steps, cfg.spec.training.batch_size) == (3, 4)  # known fields kept
    warnings = [r.getMessage() for r in caplog.records if "does not know" in r.getMessage()]
    assert len(warnings) == 1
    for path in ("spec.training.futureScheduler", "spec.model.futureKnob", "spec.newSection", "priority"):
        assert path in warnings[0]


def test_a_config_without_unknown_fields_logs_no_warning(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="qlora_trainer"):
        load_run_config(write(tmp_path, config()))
    assert not [r for r in caplog.records if "does not know" in r.getMessage()]


@pytest.mark.parametrize("field,value", [("maxSteps", "lots"), ("batchSize", -1), ("learningRate", [1])])
def test_a_known_field_of_the_wrong_type_is_still_refused(tmp_path, field, value):
    data = config(**{field: value}, futureKnob=1)  # an unknown field beside it changes nothing
    with pytest.raises(TrainerFailure) as failure:
        load_run_config(write(tmp_path, data))
    assert failure.value.exit_code == ExitCode.INVALID_CONFIG
    assert f"spec.training.{field}" in failure.value.message and "futureKnob" not in failure.value.message
