"""Each way a run can fail reaches the operator as a termination message and an exit code it can
act on (ExitCode: 2 bad config, 3 bad data, 4 model not found, 5 S3 unreachable, 8 S3 refused), not a traceback."""

import json

import pytest
from qlora_api import ExitCode, TrainerError
from trainer_fixtures.fixtures import colour_data, s3, tiny_model_dir, tiny_model_uri  # noqa: F401
from trainer_fixtures.runs import jsonl, run_config, run_trainer, trainer_env
from trainer_fixtures.s3_server import free_port
from trainer_fixtures.tiny_model import chat_records


def failed(proc) -> TrainerError:
    error = proc.termination
    assert isinstance(error, TrainerError), proc.log_tail()
    assert proc.proc.returncode == error.exit_code
    assert "\n" not in error.message and "Traceback" not in error.message
    assert proc.stdout_reports == []  # the phases that ended before the failure, nothing else
    return error


def test_invalid_config_exits_2_naming_the_field(s3, tmp_path):  # noqa: F811
    config = run_config(s3, "s3://models/x/", "s3://datasets/x.jsonl", "run-bad-config", training={"batchSize": 0})
    error = failed(run_trainer(tmp_path / "field", config, trainer_env(s3)))
    assert (error.exit_code, error.reason) == (ExitCode.INVALID_CONFIG, "InvalidConfig")
    assert "spec.training.batchSize: Input should be greater than or equal to 1" in error.message

    # The API's own cross-field rules apply too (the ones the API server enforces through CEL).
    config = run_config(s3, "s3://models/x/", "s3://datasets/x.jsonl", "run-bad-config",
                        training={"warmupRatio": 0.1, "warmupSteps": 3})
    error = failed(run_trainer(tmp_path / "rule", config, trainer_env(s3)))
    assert error.exit_code == ExitCode.INVALID_CONFIG
    assert "warmupRatio or warmupSteps, not both" in error.message


def test_config_that_is_not_json_exits_2(s3, tmp_path):  # noqa: F811
    error = failed(run_trainer(tmp_path, "{ not json", trainer_env(s3)))
    assert error.exit_code == ExitCode.INVALID_CONFIG
    assert "not valid JSON" in error.message


@pytest.mark.slow
def test_bad_json_line_exits_3_naming_file_and_line(s3, tiny_model_uri, tmp_path):  # noqa: F811
    lines = jsonl(chat_records(5)).decode().splitlines()
    lines[2] = lines[2][:-5]  # a truncated record on line 3
    data_uri = s3.put("datasets", "broken/bad.jsonl", "\n".join(lines).encode())
    proc = run_trainer(tmp_path, run_config(s3, tiny_model_uri, data_uri, "run-bad-json"), trainer_env(s3))
    error = failed(proc)
    assert (error.exit_code, error.reason) == (ExitCode.BAD_DATA, "BadData")
    assert error.message.startswith("bad.jsonl line 3: not valid JSON")
    # It failed while torch and the training libraries were still importing on their thread: no
    # "startup" phase waited for them (startup_thread.py).
    assert [p.phase for p in proc.phases] == ["checkStorage", "downloadData"]


@pytest.mark.slow
def test_bad_record_shape_exits_3_before_the_model_is_fetched(s3, tmp_path):  # noqa: F811
    records = chat_records(6)
    records[6 - 1] = {"messages": "hello"}
    data_uri = s3.put("datasets", "broken/train.jsonl", jsonl(records))
    # The model does not exist either: the data is checked first, so the data error is reported.
    config = run_config(s3, "s3://models/not-there/", data_uri, "run-bad-shape")
    error = failed(run_trainer(tmp_path, config, trainer_env(s3)))
    assert error.exit_code == ExitCode.BAD_DATA
    assert error.message == 'train.jsonl line 6: "messages" must be a list of {role, content}'


@pytest.mark.slow
def test_missing_model_exits_4(s3, colour_data, tmp_path):  # noqa: F811
    config = run_config(s3, "s3://models/no-such-model/", colour_data["train"], "run-no-model")
    error = failed(run_trainer(tmp_path, config, trainer_env(s3)))
    assert (error.exit_code, error.reason) == (ExitCode.MODEL_NOT_FOUND, "ModelNotFound")
    assert "s3://models/no-such-model/" in error.message


@pytest.mark.slow
def test_unreachable_s3_exits_5_quickly(s3, tmp_path):  # noqa: F811
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    config = run_config(s3, "s3://models/x/", "s3://datasets/x.jsonl", "run-no-s3", output={"endpointUrl": dead})
    error = failed(run_trainer(tmp_path, config, trainer_env(s3), timeout=120))
    assert (error.exit_code, error.reason) == (ExitCode.STORAGE_UNAVAILABLE, "StorageUnavailable")
    assert dead in error.message and "unreachable" in error.message
    assert ExitCode(error.exit_code).retryable


@pytest.mark.slow
def test_missing_output_bucket_exits_8_and_is_not_retried(s3, tmp_path):  # noqa: F811
    config = run_config(s3, "s3://models/x/", "s3://datasets/x.jsonl", "run-no-bucket",
                        output={"bucket": "no-such-bucket"})
    error = failed(run_trainer(tmp_path, config, trainer_env(s3)))
    assert (error.exit_code, error.reason) == (ExitCode.STORAGE_REFUSED, "StorageBucketNotFound")
    assert not ExitCode(error.exit_code).retryable and "spec.output.bucket" in error.message


def test_error_message_is_one_parseable_line(s3, tmp_path):  # noqa: F811
    proc = run_trainer(tmp_path, json.dumps({"namespace": "a"}), trainer_env(s3))
    text = proc.termination_text
    assert json.loads(text)["event"] == "error" and len(text.encode()) <= 4096
