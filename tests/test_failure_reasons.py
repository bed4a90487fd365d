"""Promise 8: every failure has its own reason and a message that says what to fix, and a
deterministic failure is never retried. No server: the trainer's classification and checks, and the
operator's derivation from pods as the API server reports them.

The trainer CLI runs of the same failures are in test_trainer_failure_reasons.py, and the cluster
run (a permanent failure keeps attempts at 1) in test_permanent_failure_cluster.py.
"""

import json

import pytest
from qlora_api import ConditionType, ExitCode, QLoRAJobSpec, Reason
from qlora_operator.conditions import find
from qlora_operator.derivation import derive_status
from qlora_operator.settings import OperatorSettings
from qlora_trainer import data, model_checks
from qlora_trainer.errors import TrainerFailure, classify, s3_error_kind, s3_failure
from qlora_trainer.reporting import error_message
from support.objects import (
    MINIMAL_SPEC,
    disruption,
    observe,
    pod,
    qlorajob,
    running,
    terminated,
    trainer_job,
    waiting,
)

NO_DELAY = OperatorSettings(retry_delay=0)


# -- S3 errors: only what can go differently next time is retried -------------------------------------

@pytest.mark.parametrize(("code", "status", "kind"), [
    ("SlowDown", 503, "transient"),
    ("ServiceUnavailable", 503, "transient"),
    ("InternalError", 500, "transient"),
    ("Unknown", 502, "transient"),
    ("TooManyRequests", 429, "transient"),
    ("RequestTimeout", 400, "transient"),
    ("RequestTimeTooSkewed", 403, "transient"),  # a 403 that a pod on another node may not get
    ("ExpiredToken", 400, "transient"),  # a new pod gets fresh credentials
    ("AccessDenied", 403, "access-denied"),
    ("InvalidAccessKeyId", 403, "access-denied"),
    ("SignatureDoesNotMatch", 403, "access-denied"),
    ("403", 403, "access-denied"),  # HEAD answers carry no body, only the status
    ("NoSuchBucket", 404, "no-bucket"),
    ("NoSuchKey", 404, "not-found"),
    ("404", 404, "not-found"),
    ("InvalidArgument", 400, "refused"),
    ("InvalidBucketName", 400, "refused"),
    ("MethodNotAllowed", 405, "refused"),
])
def test_s3_errors_are_classified_by_code_then_status(code, status, kind):
    assert s3_error_kind(code, status) == kind
    failure = s3_failure(code, status, "http://s3.test", "read", "s3://b/k")
    assert failure.exit_code.retryable == (kind == "transient")
    assert failure.exit_code == (ExitCode.STORAGE_UNAVAILABLE if kind == "transient" else ExitCode.STORAGE_REFUSED)


def test_s3_refusals_say_what_to_fix():
    denied = s3_failure("AccessDenied", 403, "http://s3.test", "write", "s3://adapters/x", "Access Denied.")
    assert denied.reason == "StorageAccessDenied"
    assert "s3://adapters/x" in denied.message and "spec.output.credentialsSecretRef" in denied.message
    no_bucket = s3_failure("NoSuchBucket", 404, "http://s3.test", "list", "s3://gone/models/")
    assert no_bucket.reason == "StorageBucketNotFound" and "spec.output.bucket" in no_bucket.message


def test_a_botocore_error_escaping_storage_is_classified_the_same_way():
    from botocore.exceptions import ClientError

    def client_error(code, status):
        return ClientError({"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}},
                           "PutObject")

    assert classify(client_error("AccessDenied", 403)).reason == "StorageAccessDenied"
    assert classify(client_error("SlowDown", 503)).exit_code == ExitCode.STORAGE_UNAVAILABLE
    assert not classify(client_error("AccessDenied", 403)).exit_code.retryable


def test_peft_refusing_target_modules_is_permanent_not_unexpected():
    said = ValueError("Target modules {'qkv'} not found in the base model. Please check the target modules and try again.")
    failure = classify(said)
    assert (failure.exit_code, failure.reason) == (ExitCode.INVALID_CONFIG, "UnknownTargetModule")
    assert not failure.exit_code.retryable
    assert classify(ValueError("something else")).reason == "Unexpected"


# -- the spec against the model's config, before any weights ------------------------------------------

@pytest.fixture(scope="module")
def llama_config_dir(tmp_path_factory):
    """config.json only: what the trainer has in hand before the weights are downloaded."""
    from transformers import LlamaConfig

    folder = tmp_path_factory.mktemp("llama-config")
    LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512).save_pretrained(folder)
    return folder


def spec(**sections) -> QLoRAJobSpec:
    """A spec that fits the 512-token test model unless `sections` say otherwise."""
    return QLoRAJobSpec.model_validate({**MINIMAL_SPEC, "training": {"maxSeqLength": 256}, **sections})


@pytest.mark.parametrize("targets", [["all-linear"], ["q_proj", "v_proj"], ["model.layers.0.self_attn.q_proj"],
                                     ["down_proj", "lm_head"]])
def test_target_modules_the_model_has_pass(llama_config_dir, targets):
    model_checks.check_spec_against_model(llama_config_dir, spec(lora={"targetModules": targets}))


@pytest.mark.parametrize(("targets", "missing"), [
    (["q_proj", "qkv_proj"], "'qkv_proj'"),  # peft alone would adapt q_proj and skip the typo silently
    (["c_attn"], "'c_attn'"),  # a GPT-2 name on a Llama
    (["mlp"], "'mlp'"),  # a block, not a layer LoRA can wrap
])
def test_a_target_module_the_model_lacks_is_a_permanent_reason_naming_both_sides(llama_config_dir, targets, missing):
    with pytest.raises(TrainerFailure) as caught:
        model_checks.check_spec_against_model(llama_config_dir, spec(lora={"targetModules": targets}))
    failure = caught.value
    assert (failure.exit_code, failure.reason) == (ExitCode.INVALID_CONFIG, "UnknownTargetModule")
    assert not failure.exit_code.retryable
    assert f"spec.lora.targetModules names {missing}," in failure.message
    assert ("its layers are: down_proj, embed_tokens, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj."
            in failure.message)


def test_max_seq_length_beyond_the_models_context_is_refused(llama_config_dir):
    model_checks.check_spec_against_model(llama_config_dir, spec(training={"maxSeqLength": 512}))
    with pytest.raises(TrainerFailure) as caught:
        model_checks.check_spec_against_model(llama_config_dir, spec(training={"maxSeqLength": 513}))
    failure = caught.value
    assert (failure.exit_code, failure.reason) == (ExitCode.INVALID_CONFIG, "MaxSeqLengthExceedsContext")
    assert "maxSeqLength 513" in failure.message and "512 tokens" in failure.message
    assert "maxSeqLength 512 or less" in failure.message


LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192,
                "low_freq_factor": 1.0, "high_freq_factor": 4.0, "rope_theta": 500000.0}


@pytest.mark.parametrize(("kind", "config", "context"), [
    ("LlamaConfig", {"max_position_embeddings": 4096}, 4096),
    ("GPT2Config", {"n_positions": 1024}, 1024),  # GPT-2's name for it
    # Llama 3.1: the config's length is already the scaled one
    ("LlamaConfig", {"max_position_embeddings": 131072, "rope_scaling": LLAMA31_ROPE}, 131072),
    # yarn added to a Qwen2.5 config, as its model card says to: the factor stretches the config's length
    ("Qwen2Config", {"max_position_embeddings": 32768,
                     "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}}, 131072),
])
def test_context_length_counts_rope_scaling(kind, config, context):
    import transformers

    assert model_checks.context_length(getattr(transformers, kind)(**config)) == context


def test_a_config_without_a_context_length_is_not_checked():
    from transformers import PretrainedConfig

    assert model_checks.context_length(PretrainedConfig()) is None


def test_a_config_transformers_cannot_read_is_unsupported_model(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    with pytest.raises(TrainerFailure) as caught:
        model_checks.check_spec_against_model(tmp_path, spec())
    assert (caught.value.exit_code, caught.value.reason) == (ExitCode.MODEL_NOT_FOUND, "UnsupportedModel")
    assert "spec.model.uri" in caught.value.message


# -- ten failures, ten reasons: what the operator makes of each ---------------------------------------

def _trainer_failure_pod(tj, failure: TrainerFailure):
    return pod(tj, phase="Failed", state=terminated(int(failure.exit_code), error_message(failure)))


def _caught(call) -> TrainerFailure:
    try:
        call()
    except TrainerFailure as failure:
        return failure
    raise AssertionError("no failure")


def _bad_data_failure(tmp_path) -> TrainerFailure:
    path = tmp_path / "train.jsonl"
    path.write_bytes(b'{"text": "fine"}\n{"txt": "a misspelt key"}\n')
    return _caught(lambda: data.read_file(path, "auto", "auto", "s3://datasets/train.jsonl"))


def _missing_model_failure(tmp_path, monkeypatch) -> TrainerFailure:
    from qlora_api.spec import ModelSource
    from qlora_trainer.model_loading import fetch_model

    monkeypatch.setenv("QLORA_PVC_ROOT", str(tmp_path))  # where the Job mounts claims
    return _caught(lambda: fetch_model(ModelSource(uri="pvc://models/llama-3-8b"), None, tmp_path))


def failure_modes(tmp_path, monkeypatch, llama_config_dir) -> dict[str, tuple]:
    """name -> (QLoRAJob spec, trainer Jobs, pods): each failure as the API server shows it."""
    job = qlorajob(spec={"backoffLimit": 3, "resources": {"memory": "8Gi"}})
    failed = trainer_job(job, finished="Failed")
    active = trainer_job(job)
    deadline_job = qlorajob(spec={"backoffLimit": 3, "activeDeadlineSeconds": 600})
    unknown_module = _caught(lambda: model_checks.check_spec_against_model(
        llama_config_dir, spec(lora={"targetModules": ["qkv"]})))
    return {
        "cuda-oom": (job, [failed], [_trainer_failure_pod(failed, classify(RuntimeError(
            "CUDA out of memory. Tried to allocate 2.00 GiB")))]),
        "host-oom": (job, [failed], [pod(failed, phase="Failed", state=terminated(137, reason="OOMKilled"))]),
        "exit-code": (job, [failed], [pod(failed, phase="Failed", state=terminated(139, "Segmentation fault"))]),
        "eviction": (job, [active], [pod(active, phase="Running", state=running(), conditions=[disruption()])]),
        "s3-access-denied": (job, [failed], [_trainer_failure_pod(failed, s3_failure(
            "AccessDenied", 403, "http://s3", "read", "s3://datasets/train.jsonl"))]),
        "s3-unreachable": (job, [failed], [_trainer_failure_pod(failed, s3_failure(
            "ServiceUnavailable", 503, "http://s3", "read", "s3://datasets/train.jsonl"))]),
        "deadline": (deadline_job, [trainer_job(deadline_job, finished="Failed", reason="DeadlineExceeded",
                                                deadline=600)], []),
        "missing-secret": (job, [active], [pod(active, state=waiting("CreateContainerConfigError",
                                                                     'secret "s3-creds" not found'))]),
        "missing-model": (job, [failed], [_trainer_failure_pod(failed, _missing_model_failure(tmp_path, monkeypatch))]),
        "bad-data": (job, [failed], [_trainer_failure_pod(failed, _bad_data_failure(tmp_path))]),
        "unknown-target-module": (job, [failed], [_trainer_failure_pod(failed, unknown_module)]),
    }


# name -> (reason on the Running condition, what happens next, a fragment of the fix in the message)
EXPECTED = {
    "cuda-oom": ("CudaOutOfMemory", "failed", "training.batchSize"),
    "host-oom": (Reason.OOM_KILLED, "failed", "spec.resources.memory"),
    "exit-code": (Reason.TRAINER_CRASHED, "retried", "signal 11"),
    "eviction": (Reason.EVICTED, "replaced", "resumes from its last checkpoint"),
    "s3-access-denied": ("StorageAccessDenied", "failed", "spec.output.credentialsSecretRef"),
    "s3-unreachable": ("StorageUnavailable", "retried", "transient"),
    "deadline": (Reason.DEADLINE_EXCEEDED, "failed", "spec.activeDeadlineSeconds"),
    "missing-secret": (Reason.SECRET_NOT_FOUND, "waits", "create Secret s3-creds"),
    "missing-model": ("ModelNotFound", "failed", "spec.model.uri"),
    "bad-data": ("BadData", "failed", "train.jsonl line 2: \"text\" must be"),
    "unknown-target-module": ("UnknownTargetModule", "failed", "spec.lora.targetModules names 'qkv'"),
}


def test_every_failure_mode_has_a_reason_of_its_own():
    reasons = [reason for reason, _, _ in EXPECTED.values()]
    assert len(set(reasons)) == len(reasons)


@pytest.mark.parametrize("mode", sorted(EXPECTED))
def test_each_failure_gets_its_reason_a_fix_and_a_retry_only_if_transient(mode, tmp_path, monkeypatch,
                                                                          llama_config_dir):
    job, jobs, pods = failure_modes(tmp_path, monkeypatch, llama_config_dir)[mode]
    reason, outcome, fix = EXPECTED[mode]
    status, events = derive_status(job, observe(job, jobs, pods), NO_DELAY)
    running_cond = find(status, ConditionType.RUNNING)
    assert running_cond.reason == reason, running_cond.message
    assert fix in running_cond.message
    assert status.attempts == 1
    if outcome == "failed":  # permanent: terminal after one attempt, whatever backoffLimit allows
        assert status.phase == "Failed"
        assert find(status, ConditionType.FAILED).reason == reason
    else:  # retried as attempt 2, replaced within attempt 1, or waiting for the Secret
        assert status.phase == "Pending" and find(status, ConditionType.FAILED) is None
        assert ("attempt 2 of 4 starts now" in status.message) == (outcome == "retried")
    assert any(e.reason == reason for e in events)
