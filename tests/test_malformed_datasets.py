"""Malformed datasets stop the run with the file and the line (BadData, exit 3, never retried),
whatever is wrong: JSON, fields, emptiness, encoding, or a record longer than maxSeqLength.

The readers run on files as they come out of S3; one trainer CLI run shows the message reaching
the termination message, and test_failure_reasons_cluster.py shows it in a QLoRAJob's status.
"""

import gzip
import json

import pytest
from qlora_api import ExitCode, TrainerError
from qlora_api.spec import TrainingSpec
from qlora_trainer import data
from qlora_trainer.errors import TrainerFailure
from trainer_fixtures.fixtures import colour_data, s3, tiny_model_dir, tiny_model_uri  # noqa: F401
from trainer_fixtures.runs import run_config, run_trainer, trainer_env
from trainer_fixtures.tiny_model import build_tokenizer, chat_record

GOOD = json.dumps({"messages": [{"role": "user", "content": "what colour is the sky"},
                                {"role": "assistant", "content": "the sky is blue"}]})

CASES = {
    "truncated JSON": (f"{GOOD}\n{GOOD}\n{GOOD[:-7]}\n".encode(), "train.jsonl line 3: not valid JSON"),
    "a JSON array, not an object": (f"{GOOD}\n[1, 2]\n".encode(), "train.jsonl line 2: expected a JSON object"),
    "missing messages": (f"{GOOD}\n{json.dumps({'prompt': 'hi'})}\n".encode(),
                         'train.jsonl line 2: "messages" must be a list of {role, content}'),
    "a message without content": (
        f"{GOOD}\n\n{json.dumps({'messages': [{'role': 'user'}]})}\n".encode(),
        'train.jsonl line 3: "messages" must be a list of {role, content}'),
    "no assistant turn": (
        f"{json.dumps({'messages': [{'role': 'user', 'content': 'hi'}]})}\n".encode(),
        'train.jsonl line 1: "messages" has no assistant turn'),
    "an unknown role": (
        f"{GOOD}\n{json.dumps({'messages': [{'role': 'bot', 'content': 'hi'}]})}\n".encode(),
        "train.jsonl line 2: unknown role 'bot'"),
    "an empty file": (b"", "train.jsonl: no records (the file is empty)"),
    "only blank lines": (b"\n  \n\n", "train.jsonl: no records (only blank lines)"),
    "Latin-1 bytes": (f"{GOOD}\n".encode() + b'{"text": "caf\xe9"}\n', "train.jsonl line 2: not UTF-8 (byte 0xe9"),
    "UTF-16 with a byte order mark": (f"{GOOD}\n".encode("utf-16"), "train.jsonl line 1: the file is UTF-16"),
    "UTF-16 without a byte order mark": (f"{GOOD}\n{GOOD}\n".encode("utf-16-le"),
                                         "train.jsonl line 1: holds NUL bytes"),
    "gzip under a .jsonl name": (gzip.compress(f"{GOOD}\n".encode()), "train.jsonl line 1: the file is gzip"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_malformed_file_names_its_file_and_line(case, tmp_path):
    body, expected = CASES[case]
    path = tmp_path / "download"
    path.write_bytes(body)
    with pytest.raises(TrainerFailure) as caught:
        data.read_file(path, "auto", "auto", "s3://datasets/chat/train.jsonl")
    assert (caught.value.exit_code, caught.value.reason) == (ExitCode.BAD_DATA, "BadData")
    assert caught.value.message.startswith(expected), caught.value.message
    assert not caught.value.exit_code.retryable


def test_a_utf8_byte_order_mark_and_non_ascii_text_are_fine(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"text": "café ☕ 東京"}, ensure_ascii=False).encode() + b"\n")
    [record] = data.read_file(path, "auto", "auto")
    assert record.value == {"text": "café ☕ 東京"} and record.where == "train.jsonl line 1"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def test_a_record_longer_than_max_seq_length_names_its_line_and_the_length_that_fits(tokenizer):
    import random

    rng = random.Random(0)
    short = [data.Record(f"train.jsonl line {i}", "messages", chat_record("sky", rng)) for i in range(1, 5)]
    long_record = {"messages": [{"role": "user", "content": " ".join(["what colour is the sky"] * 20)},
                                {"role": "assistant", "content": "the sky is blue"}]}
    records = short[:2] + [data.Record("train.jsonl line 3", "messages", long_record)] + short[2:]
    spec = TrainingSpec(maxSeqLength=32)
    with pytest.raises(TrainerFailure) as caught:
        data.build_examples(records, tokenizer, spec, "train")
    message = caught.value.message
    length = len(data.tokenize(records[2], tokenizer, True).input_ids)
    assert caught.value.reason == "BadData"
    assert message.startswith(f"train.jsonl line 3: {length} tokens, longer than spec.training.maxSeqLength 32")
    assert f"maxSeqLength {length} or more" in message
    # Within the limit, the same records train.
    assert data.build_examples(records, tokenizer, TrainingSpec(maxSeqLength=length), "train")


@pytest.mark.slow
def test_the_trainer_reports_a_bad_encoding_with_file_and_line(s3, tmp_path):  # noqa: F811
    data_uri = s3.put("datasets", "latin1/chat.jsonl", f"{GOOD}\n{GOOD}\n".encode() + b'{"text": "na\xefve"}\n')
    config = run_config(s3, "s3://models/not-needed/", data_uri, "run-latin1")
    proc = run_trainer(tmp_path, config, trainer_env(s3))
    error = proc.termination
    assert isinstance(error, TrainerError), proc.log_tail()
    assert (proc.proc.returncode, error.reason) == (ExitCode.BAD_DATA, "BadData")
    assert error.message.startswith("chat.jsonl line 3: not UTF-8 (byte 0xef")


@pytest.mark.slow
def test_the_trainer_reports_a_too_long_record_with_file_and_line(s3, tiny_model_uri, tmp_path):  # noqa: F811
    import random

    rng = random.Random(1)
    records = [chat_record("sky", rng) for _ in range(6)]
    records[4] = {"messages": [{"role": "user", "content": " ".join(["tell me the colour of the sky"] * 12)},
                               {"role": "assistant", "content": "the sky is blue"}]}
    data_uri = s3.put("datasets", "long/chat.jsonl", "\n".join(json.dumps(r) for r in records).encode())
    proc = run_trainer(tmp_path, run_config(s3, tiny_model_uri, data_uri, "run-long"), trainer_env(s3))
    error = proc.termination
    assert isinstance(error, TrainerError), proc.log_tail()
    assert (proc.proc.returncode, error.reason) == (ExitCode.BAD_DATA, "BadData")
    assert error.message.startswith("chat.jsonl line 5: ")
    assert "longer than spec.training.maxSeqLength 64" in error.message
