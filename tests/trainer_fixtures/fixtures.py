"""pytest fixtures of the trainer tests (imported by each test_trainer*.py module)."""

import pytest

from trainer_fixtures.s3_server import running_s3
from trainer_fixtures.tiny_model import build_model, chat_records


@pytest.fixture(scope="session")
def s3():
    with running_s3() as server:
        for bucket in ("models", "datasets", "adapters"):
            server.make_bucket(bucket)
        yield server


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    build_model(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_uri(s3, tiny_model_dir):
    """The base model as the operator would point at it: an s3:// folder of safetensors."""
    return s3.upload_folder(tiny_model_dir, "models", "tiny-llama")


@pytest.fixture(scope="session")
def colour_data(s3):
    """Train and held-out eval splits of the colour task, as JSONL in S3."""
    from trainer_fixtures.runs import jsonl

    train, held_out = chat_records(240, seed=1), chat_records(40, seed=2)
    return {
        "train": s3.put("datasets", "colours/train.jsonl", jsonl(train)),
        "eval": s3.put("datasets", "colours/eval.jsonl", jsonl(held_out)),
        "eval_records": held_out,
    }
