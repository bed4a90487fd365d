"""Promise 8 through the real trainer CLI: what can be checked before the weights load is checked
there, and each failure leaves the exit code that tells the operator whether to retry.

Target modules and maxSeqLength are checked against the model's config.json before a single
safetensors byte is downloaded (the scratch folder proves it). S3 access denied needs a store that
checks credentials, so it runs against a private MinIO (moto accepts any key).
"""

import pytest
from qlora_api import ExitCode, TrainerError
from trainer_fixtures.fixtures import colour_data, s3, tiny_model_dir, tiny_model_uri  # noqa: F401
from trainer_fixtures.minio_server import running_minio
from trainer_fixtures.runs import jsonl, run_config, run_trainer, trainer_env
from trainer_fixtures.tiny_model import chat_records

pytestmark = pytest.mark.slow  # each run imports torch and transformers (~10 s on 2 cores)


def failed(proc) -> TrainerError:
    error = proc.termination
    assert isinstance(error, TrainerError), proc.log_tail()
    assert proc.proc.returncode == error.exit_code
    assert "\n" not in error.message and "Traceback" not in error.message
    return error


def downloaded_weights(workdir) -> list[str]:
    return sorted(p.name for p in (workdir / "scratch" / "model").glob("*.safetensors"))


def test_an_unknown_target_module_fails_before_the_weights_are_downloaded(s3, tiny_model_uri, colour_data,  # noqa: F811
                                                                         tmp_path):
    config = run_config(s3, tiny_model_uri, colour_data["train"], "run-unknown-module",
                        lora={"targetModules": ["q_proj", "query_key_value"]})
    proc = run_trainer(tmp_path, config, trainer_env(s3))
    error = failed(proc)
    assert (error.exit_code, error.reason) == (ExitCode.INVALID_CONFIG, "UnknownTargetModule")
    assert not ExitCode(error.exit_code).retryable
    assert "spec.lora.targetModules names 'query_key_value'" in error.message
    assert "q_proj" in error.message.split("its layers are:")[1]
    assert (tmp_path / "scratch" / "model" / "config.json").is_file()
    assert downloaded_weights(tmp_path) == []


def test_max_seq_length_beyond_the_context_fails_before_the_weights_are_downloaded(s3, tiny_model_uri,  # noqa: F811
                                                                                  colour_data, tmp_path):  # noqa: F811
    config = run_config(s3, tiny_model_uri, colour_data["train"], "run-too-long", training={"maxSeqLength": 4096})
    error = failed(run_trainer(tmp_path, config, trainer_env(s3)))
    assert (error.exit_code, error.reason) == (ExitCode.INVALID_CONFIG, "MaxSeqLengthExceedsContext")
    assert "maxSeqLength 4096" in error.message and "512 tokens" in error.message
    assert downloaded_weights(tmp_path) == []


def test_s3_access_denied_is_permanent_and_names_the_secret(tmp_path):
    with running_minio(tmp_path / "minio") as minio:
        store = minio.server
        store.make_bucket("adapters")
        store.make_bucket("datasets")
        data_uri = store.put("datasets", "train.jsonl", jsonl(chat_records(4)))
        config = run_config(store, "s3://models/x/", data_uri, "run-denied")
        wrong_key = {**store.env, "AWS_SECRET_ACCESS_KEY": "not-the-secret"}
        error = failed(run_trainer(tmp_path / "run", config, trainer_env(None, **wrong_key), timeout=120))
    assert (error.exit_code, error.reason) == (ExitCode.STORAGE_REFUSED, "StorageAccessDenied")
    assert not ExitCode(error.exit_code).retryable
    assert "SignatureDoesNotMatch" in error.message or "403" in error.message
    assert "spec.output.credentialsSecretRef" in error.message
