"""The trainer's pieces on their own: record checks, tokenization and packing, the translators to
bitsandbytes/peft, the termination message, S3 transfers and checkpoint selection."""

import functools
import hashlib
import itertools
import json
import os
import random

import pytest
import torch
from botocore.exceptions import EndpointConnectionError
from qlora_api import ExitCode, PublishedFile, TrainerProgressLine, TrainingResult
from qlora_api.spec import LoRASpec, OutputSpec, QuantizationSpec, TrainingSpec
from qlora_trainer import data, errors, model_loading, reporting
from qlora_trainer.checkpoints import CheckpointStore
from qlora_trainer.storage import S3Storage, S3Uri, TransferConfig, fetch_file
from trainer_fixtures.fixtures import s3, tiny_model_dir  # noqa: F401
from trainer_fixtures.tiny_model import build_tokenizer, chat_records


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tok"))


def write_jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


# -- records ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("row, message", [
    ({"messages": [{"role": "user"}]}, '"messages" must be a list of {role, content}'),
    ({"messages": [{"role": "user", "content": "hi"}]}, '"messages" has no assistant turn to learn from'),
    ({"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]}, "unknown role 'robot' (expected one of assistant, developer, system, tool, user)"),
    ({"text": "a text record among chat records"}, '"messages" must be a list of {role, content}'),
    (["not", "an", "object"], "expected a JSON object, got list"),
])
def test_bad_chat_record_is_named_by_file_and_line(tmp_path, row, message):
    path = write_jsonl(tmp_path / "train.jsonl", [*chat_records(3), "", row])  # line 4 is blank
    with pytest.raises(errors.TrainerFailure) as failure:
        data.read_file(path, "auto", "auto")
    assert failure.value.exit_code == ExitCode.BAD_DATA
    assert failure.value.message == f"train.jsonl line 5: {message}"


def test_prompt_completion_and_text_records_are_checked(tmp_path):
    path = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "a", "completion": 3}])
    with pytest.raises(errors.TrainerFailure, match=r'^pc.jsonl line 2: "completion" must be a string$'):
        data.read_file(path, "auto", "auto")
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": ""}])
    with pytest.raises(errors.TrainerFailure, match=r'^t.jsonl line 1: "text" must be a non-empty string$'):
        data.read_file(path, "auto", "text")


def test_parquet_records_are_read_and_named_by_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"text": "red sky"}, {"text": None}]), tmp_path / "d.parquet")
    with pytest.raises(errors.TrainerFailure, match=r'^d.parquet row 2: "text" must be a non-empty string$'):
        data.read_file(tmp_path / "d.parquet", "auto", "auto")
    pq.write_table(pa.Table.from_pylist(chat_records(4)), tmp_path / "c.parquet")
    records = data.read_file(tmp_path / "c.parquet", "auto", "auto")
    assert [r.shape for r in records] == ["messages"] * 4 and records[3].where == "c.parquet row 4"


def test_pvc_uri_reads_from_the_mounted_claim(tmp_path, monkeypatch):
    (tmp_path / "claim" / "sets").mkdir(parents=True)
    write_jsonl(tmp_path / "claim" / "sets" / "a.jsonl", chat_records(2))
    monkeypatch.setenv("QLORA_PVC_ROOT", str(tmp_path))
    path = fetch_file("pvc://claim/sets/a.jsonl", storage=None, dest_dir=tmp_path / "dl")
    assert len(data.read_file(path, "auto", "auto")) == 2
    with pytest.raises(FileNotFoundError):
        fetch_file("pvc://claim/sets/missing.jsonl", storage=None, dest_dir=tmp_path / "dl")


def test_eval_split_is_fixed_by_the_seed():
    records = [data.Record(f"l{i}", "text", {"text": str(i)}) for i in range(50)]
    a, b, c = (data.split_eval(records, 0.2, seed) for seed in (7, 7, 8))
    assert len(a.eval) == 10 and len(a.train) == 40
    assert {r.where for r in a.eval} == {r.where for r in b.eval} != {r.where for r in c.eval}
    assert not {r.where for r in a.eval} & {r.where for r in a.train}


# -- tokens, labels, packing ----------------------------------------------------------------------------------


def test_chat_loss_covers_only_the_assistant_turns(tokenizer):
    record = data.Record("x", "messages", {"messages": [
        {"role": "system", "content": "answer it"}, {"role": "user", "content": "what colour is the sky"},
        {"role": "assistant", "content": "the sky is blue"}, {"role": "user", "content": "the snow"},
        {"role": "assistant", "content": "the snow is white"}]})
    example = data.tokenize(record, tokenizer, completion_only=True)
    learned = [tokenizer.convert_ids_to_tokens(t) for t, label in zip(example.input_ids, example.labels)
               if label != data.IGNORE]
    assert learned == ["the", "sky", "is", "blue", "</s>", "the", "snow", "is", "white", "</s>"]
    everything = data.tokenize(record, tokenizer, completion_only=False)
    assert everything.labels[1:] == everything.input_ids[1:]


def test_prompt_completion_loss_is_on_the_completion_and_eos(tokenizer):
    record = data.Record("x", "promptCompletion", {"prompt": "what colour is the sky", "completion": "blue"})
    example = data.tokenize(record, tokenizer, completion_only=True)
    learned = [tokenizer.convert_ids_to_tokens(t) for t, label in zip(example.input_ids, example.labels)
               if label != data.IGNORE]
    assert learned == ["blue", "</s>"]
    text = data.tokenize(data.Record("x", "text", {"text": "the sky is blue"}), tokenizer, True)
    assert tokenizer.convert_ids_to_tokens(text.input_ids) == ["<s>", "the", "sky", "is", "blue", "</s>"]
    assert text.labels == [data.IGNORE, *text.input_ids[1:]]


class _CountingTokenizer:
    """The fixture tokenizer, counting its encode calls (everything else passes through)."""

    def __init__(self, tokenizer):
        self.__dict__["_inner"], self.__dict__["calls"] = tokenizer, 0

    def __call__(self, *args, **kwargs):
        self.__dict__["calls"] += 1
        return self._inner(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._inner, name)


@pytest.mark.parametrize("shape", ["text", "promptCompletion", "messages"])
def test_records_are_tokenized_in_batches_with_the_ids_of_one_by_one(tokenizer, shape):
    records = [data.Record(f"line {i}", shape, value) for i, value in enumerate(
        {"text": {"text": f"the {t} is {c}"}, "promptCompletion": {"prompt": f"what colour is the {t}", "completion": c},
         "messages": r}[shape] for r, t, c in zip(chat_records(40, seed=3), ["sky", "grass"] * 20,
                                                     ["blue", "green"] * 20))]
    counting = _CountingTokenizer(tokenizer)
    batched = data.tokenize_all(records, counting, completion_only=True)
    # one call per field (prompt and completion: two), not one per record: the per-call overhead was
    # 8x a batched pass in the CLI's tokenize phase (benchmarks/results/trainer_cli_speed_h200.md)
    assert counting.calls == (2 if shape == "promptCompletion" else 1)
    one_by_one = [data.tokenize(r, tokenizer, completion_only=True) for r in records]
    assert [vars(e) for e in batched] == [vars(e) for e in one_by_one]
    assert all(e.labels[0] == data.IGNORE and any(t != data.IGNORE for t in e.labels) for e in batched)


class _ParallelismSeeingTokenizer(_CountingTokenizer):
    """The fixture tokenizer, noting TOKENIZERS_PARALLELISM as the Rust library reads it at each call."""

    def __call__(self, *args, **kwargs):
        self.__dict__.setdefault("seen", []).append(os.environ.get("TOKENIZERS_PARALLELISM"))
        return super().__call__(*args, **kwargs)


@pytest.mark.parametrize("before", ["false", None])
def test_the_batched_pass_runs_on_the_tokenizers_threads_and_leaves_the_setting_as_it_was(
        tokenizer, monkeypatch, before):
    # The trainer image sets "false" (no pool left behind for a fork); that made the tokenize phase
    # one thread: 14x the batched pass on the H200 machine's 16 cores (trainer_cli_speed_h200.md).
    if before is None:
        monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    else:
        monkeypatch.setenv("TOKENIZERS_PARALLELISM", before)
    spec = TrainingSpec(maxSeqLength=64, packing=False)
    seeing = _ParallelismSeeingTokenizer(tokenizer)
    records = [data.Record(f"line {i}", "text", {"text": f"the {t} is blue"}) for i, t in enumerate(["sky"] * 30)]
    rows = data.build_examples(records, seeing, spec, "train")
    assert seeing.seen == ["true"] and len(rows) == 30
    assert os.environ.get("TOKENIZERS_PARALLELISM") == before
    with pytest.raises(KeyError), data.tokenizer_threads():  # restored on the way out of a failure too
        raise KeyError("a tokenizer error")
    assert os.environ.get("TOKENIZERS_PARALLELISM") == before


def test_packing_fills_rows_without_splitting_records():
    rng = random.Random(0)
    examples = [data.Example(list(range(100 * i, 100 * i + n)), list(range(n))) for i, n in
                enumerate(rng.randint(3, 30) for _ in range(200))]
    rows = data.pack(examples, 64)
    assert all(len(r.input_ids) <= 64 for r in rows)
    total = sum(len(e.input_ids) for e in examples)
    assert len(rows) <= total // 64 + 2  # best-fit decreasing leaves rows nearly full
    segments = []
    for row in rows:
        starts = [i for i, p in enumerate(row.position_ids) if p == 0] + [len(row.input_ids)]
        segments += [tuple(row.input_ids[a:b]) for a, b in itertools.pairwise(starts)]
        assert row.position_ids == [p for a, b in itertools.pairwise(starts) for p in range(b - a)]
    assert sorted(segments) == sorted(tuple(e.input_ids) for e in examples)


def test_packed_records_do_not_attend_to_each_other(tiny_model_dir):  # noqa: F811
    """A packed row gives each record exactly the logits it gets alone (block-diagonal attention)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    model.config.use_cache = False
    records = [[5, 9, 12, 7], [8, 8, 30, 11, 6, 9], [14, 20, 3]]
    row = data.pack([data.Example(r, r) for r in records], 16)[0]
    batch = data.Collator(pad_token_id=0, packed=True)([vars(row)])
    assert "attention_mask" not in batch
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
        offset = 0
        for ids in sorted(records, key=len, reverse=True):  # the packing order
            alone = model(input_ids=torch.tensor([ids])).logits[0]
            torch.testing.assert_close(packed[offset:offset + len(ids)], alone, atol=1e-5, rtol=1e-4)
            offset += len(ids)


def test_collator_pads_with_unlabelled_tokens():
    rows = [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3], "position_ids": [0, 1, 2]},
            {"input_ids": [4], "labels": [-100], "position_ids": [0]}]
    packed = data.Collator(pad_token_id=0, packed=True, pad_to_multiple_of=4)(rows)
    assert packed["input_ids"].tolist() == [[1, 2, 3, 0], [4, 0, 0, 0]]
    assert packed["labels"].tolist() == [[-100, 2, 3, -100], [-100, -100, -100, -100]]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 0], [0, 0, 1, 2]]
    plain = data.Collator(pad_token_id=0, packed=False, pad_to_multiple_of=4)(rows)
    assert plain["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]] and "position_ids" not in plain
    # full rows need no mask (an all-ones mask masks nothing): the fast path's fixed-row CUDA graphs apply
    full = data.Collator(pad_token_id=0, packed=False, pad_to_multiple_of=4)([rows[0] | {"input_ids": [1, 2, 3, 4],
                                                                              "labels": [-100, 2, 3, 4]}] * 2)
    assert set(full) == {"input_ids", "labels"} and full["input_ids"].shape == (2, 4)


@pytest.mark.parametrize("field,value,where", [("input_ids", 50, "token id 50 (row 1, position 2)"),
                                               ("labels", 64, "label 64 (row 1, position 2)"),
                                               ("labels", -1, "label -1 (row 1, position 2)")])
def test_collator_stops_on_ids_outside_the_models_vocabulary(field, value, where):
    """The trainer's collator checks ids and labels on the host (so the fused loss need not stall
    the GPU for it every micro-step) and names the offending token; -100 and padding pass."""
    from qlora_trainer.errors import TrainerFailure

    rows = [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3], "position_ids": [0, 1, 2]},
            {"input_ids": [4, 5, 6], "labels": [-100, 5, 6], "position_ids": [0, 1, 2]}]
    collate = data.Collator(pad_token_id=0, packed=True, pad_to_multiple_of=4, vocab_size=50)
    assert collate(rows)["labels"].tolist() == [[-100, 2, 3, -100], [-100, 5, 6, -100]]
    rows[1][field] = [*rows[1][field][:2], value]
    with pytest.raises(TrainerFailure) as caught:
        collate(rows)
    assert caught.value.reason == "BadData" and where in str(caught.value) and "(0..49" in str(caught.value)
    data.Collator(pad_token_id=0, packed=True, pad_to_multiple_of=4)(rows)  # unchecked without a vocabulary


def test_the_collators_vocabulary_is_what_both_the_embeddings_and_the_lm_head_hold():
    """A sequence's tokens are the model's inputs and, shifted, its labels: the trainer's collator
    checks them against the smaller of the input embeddings' and the LM head's rows."""
    from qlora_trainer.training_loop import _vocab_rows
    from transformers import LlamaConfig, LlamaForCausalLM

    lm = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1))
    assert _vocab_rows(lm) == 100
    lm.lm_head = torch.nn.Linear(16, 90, bias=False)
    assert _vocab_rows(lm) == 90
    lm.set_input_embeddings(torch.nn.Embedding(80, 16))
    assert _vocab_rows(lm) == 80


# -- translators ----------------------------------------------------------------------------------------------


def test_quantization_config_follows_the_spec():
    nf4 = model_loading.quantization_config(QuantizationSpec())
    assert (nf4.load_in_4bit, nf4.bnb_4bit_quant_type, nf4.bnb_4bit_use_double_quant) == (True, "nf4", True)
    assert nf4.bnb_4bit_compute_dtype == torch.float32  # auto on a CPU: bf16 matmuls are slow there
    fp4 = model_loading.quantization_config(QuantizationSpec(quantType="fp4", doubleQuant=False,
                                                             computeDtype="bfloat16"))
    assert (fp4.bnb_4bit_quant_type, fp4.bnb_4bit_use_double_quant) == ("fp4", False)
    assert fp4.bnb_4bit_compute_dtype == torch.bfloat16


def test_lora_config_follows_the_spec():
    default = model_loading.lora_config(LoRASpec())
    assert default.target_modules == "all-linear" and (default.r, default.lora_alpha) == (16, 32)
    custom = model_loading.lora_config(LoRASpec(r=4, alpha=8, dropout=0.1, targetModules=["q_proj", "v_proj"],
                                                bias="lora_only"))
    assert set(custom.target_modules) == {"q_proj", "v_proj"}
    assert (custom.r, custom.lora_alpha, custom.lora_dropout, custom.bias) == (4, 8, 0.1, "lora_only")


def test_sft_config_follows_the_spec(tmp_path):
    from qlora_trainer.training_loop import sft_config

    spec = TrainingSpec(scheduler="linear", warmupSteps=7, batchSize=3, gradientAccumulationSteps=5, seed=9,
                        maxSteps=11, optimizer="paged_adamw_8bit", checkpointSteps=4)
    args = sft_config(spec, tmp_path, torch.float32, checkpoints=True)
    assert (args.lr_scheduler_type, args.warmup_steps, args.per_device_train_batch_size) == ("linear", 7, 3)
    assert (args.gradient_accumulation_steps, args.seed, args.max_steps, args.save_steps) == (5, 9, 11, 4)
    assert args.optim == "adamw_torch"  # paged optimizers need CUDA; this machine has none
    assert args.gradient_checkpointing and args.max_grad_norm == 0.3
    assert sft_config(TrainingSpec(), tmp_path, torch.float32, True).warmup_steps == 0.03  # 3% of all steps


# -- reporting and errors -------------------------------------------------------------------------------------


def test_result_message_drops_the_file_list_to_fit_4096_bytes():
    files = [PublishedFile(path=f"merged/model-{i:05d}-of-00200.safetensors", size=i, sha256="a" * 64)
             for i in range(200)]
    result = TrainingResult(adapterUri="s3://b/p/", manifestUri="s3://b/p/manifest.json", manifestSha256="b" * 64,
                            files=files, evalLossBefore=2.0, evalLossAfter=1.0, resumedFromStep=30)
    text = reporting.result_message(result)
    assert len(text.encode()) <= 4096
    parsed = json.loads(text)["result"]
    assert "files" not in parsed or parsed["files"] == []
    assert parsed["manifestSha256"] == "b" * 64 and parsed["resumedFromStep"] == 30
    small = reporting.result_message(result.model_copy(update={"files": files[:2]}))
    assert len(json.loads(small)["result"]["files"]) == 2


def test_error_message_stays_one_line_under_the_limit():
    failure = errors.bad_data("x.jsonl line 1:\n" + "é" * 5000)
    text = reporting.error_message(failure)
    assert len(text.encode()) <= 4096 and "\n" not in json.loads(text)["message"]


def test_cuda_out_of_memory_exits_6_with_a_hint():
    failure = errors.classify(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert (failure.exit_code, failure.reason) == (ExitCode.OUT_OF_MEMORY, "CudaOutOfMemory")
    assert "batchSize" in failure.message and "gradientCheckpointing" in failure.message


def test_other_failures_are_classified():
    assert errors.classify(EndpointConnectionError(endpoint_url="http://x")).exit_code == ExitCode.STORAGE_UNAVAILABLE
    unexpected = errors.classify(ZeroDivisionError("division by zero"))
    assert (unexpected.exit_code, unexpected.message) == (ExitCode.UNEXPECTED, "ZeroDivisionError: division by zero")


def test_progress_summary():
    assert reporting.summary(120, 300) == "120/300 (40%)"
    assert reporting.summary(3, None) == "3"


class Lines:
    def __init__(self):
        self.lines = []

    def write(self, text):
        self.lines += [TrainerProgressLine.parse(line) for line in text.splitlines()]

    def flush(self):
        pass


def test_progress_lines_carry_the_newest_checkpoint_and_a_resume_is_reported_before_the_first_step():
    from qlora_trainer.training_loop import ProgressReport
    from transformers import TrainerControl, TrainerState

    store = CheckpointStore(None, S3Uri.parse("s3://adapters/runs/r1/checkpoints"))
    fresh = ProgressReport(reporting.ProgressReporter(Lines()), 1.0, None, checkpoints=store)
    sink = fresh.reporter.stream
    fresh.on_train_begin(None, TrainerState(global_step=0, max_steps=20), TrainerControl())
    assert sink.lines == []  # a run from step 0 has nothing to say yet
    fresh.checkpoint_saved(5)
    fresh.on_log(None, TrainerState(global_step=6, max_steps=20, epoch=0.3), TrainerControl(), logs={"loss": 1.0})
    assert (sink.lines[-1].step, sink.lines[-1].checkpoint_step, sink.lines[-1].resumed_from_step) == (6, 5, None)
    assert sink.lines[-1].checkpoint_uri == "s3://adapters/runs/r1/checkpoints/step-5/"

    resumed = ProgressReport(reporting.ProgressReporter(Lines()), 1.0, None, checkpoints=store)
    resumed.on_train_begin(None, TrainerState(global_step=7, max_steps=20, epoch=0.35), TrainerControl())
    first = resumed.reporter.stream.lines[0]
    assert (first.step, first.resumed_from_step, first.checkpoint_step, first.loss) == (7, 7, 7, None)
    assert first.summary == "7/20 (35%)"


# -- S3 -----------------------------------------------------------------------------------------------------------


def storage_for(s3) -> S3Storage:  # noqa: F811
    return S3Storage(OutputSpec(bucket="adapters", endpointUrl=s3.endpoint, addressingStyle="path"))


def test_large_files_go_up_in_parts_and_come_back_intact(s3, tmp_path, monkeypatch):  # noqa: F811
    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    mib = 1024 * 1024
    storage = S3Storage(OutputSpec(bucket="adapters", endpointUrl=s3.endpoint, addressingStyle="path"),
                        transfer=TransferConfig(multipart_threshold=5 * mib, multipart_chunksize=5 * mib))
    blob = tmp_path / "blob.bin"
    blob.write_bytes(random.Random(1).randbytes(12 * mib))
    uri = S3Uri.parse("s3://adapters/units/blob.bin")
    storage.upload_file(blob, uri)
    head = s3.client().head_object(Bucket="adapters", Key="units/blob.bin")
    assert head["ETag"].strip('"').endswith("-3")  # three parts
    back = storage.download_file(uri, tmp_path / "back.bin")
    assert hashlib.sha256(back.read_bytes()).digest() == hashlib.sha256(blob.read_bytes()).digest()


def test_a_file_above_the_threshold_goes_up_in_as_many_parts_as_there_are_in_flight_and_hashed_beside(
        s3, tmp_path, monkeypatch):  # noqa: F811
    """A file just over the threshold used to go up as one configured-size part plus a remainder (an
    84 MB adapter in 64 MiB parts: one request carried most of it). Now its parts are sized so that
    every concurrent request has one (at least 8 MiB each), and its sha256 is taken on a thread
    beside the upload: the published entry still describes the object byte for byte, and a failed
    upload still fails the set."""
    from qlora_trainer.publishing import OVERLAP_HASH_BYTES, upload_files

    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    mib = 1024 * 1024
    transfer = TransferConfig(multipart_threshold=16 * mib, multipart_chunksize=64 * mib, max_concurrency=3)
    storage = S3Storage(OutputSpec(bucket="adapters", endpointUrl=s3.endpoint, addressingStyle="path"),
                        transfer=transfer)
    folder = tmp_path / "adapter"
    folder.mkdir()
    body = random.Random(2).randbytes(24 * mib)
    assert len(body) >= OVERLAP_HASH_BYTES
    (folder / "adapter_model.safetensors").write_bytes(body)
    (folder / "adapter_config.json").write_text('{"r": 8}')
    files = {p.name: p for p in folder.iterdir()}
    entries = upload_files(storage, S3Uri.parse("s3://adapters/units/parts"), files)
    head = s3.client().head_object(Bucket="adapters", Key="units/parts/adapter_model.safetensors")
    assert head["ETag"].strip('"').endswith("-3")  # 24 MiB over 3 requests: 8 MiB each, not 24 + 0
    assert s3.get("adapters", "units/parts/adapter_model.safetensors") == body
    assert [(e.path, e.size, e.sha256) for e in entries] == [
        ("adapter_config.json", 8, hashlib.sha256(b'{"r": 8}').hexdigest()),
        ("adapter_model.safetensors", len(body), hashlib.sha256(body).hexdigest())]
    # Below the threshold a file stays one PUT, whatever the concurrency.
    small = tmp_path / "small.bin"
    small.write_bytes(body[:9 * mib])
    storage.upload_file(small, S3Uri.parse("s3://adapters/units/parts/small.bin"))
    assert "-" not in s3.client().head_object(Bucket="adapters", Key="units/parts/small.bin")["ETag"]

    missing = S3Storage(OutputSpec(bucket="no-such-bucket", endpointUrl=s3.endpoint, addressingStyle="path"),
                        transfer=transfer)
    with pytest.raises(errors.TrainerFailure, match="no-such-bucket"):
        upload_files(missing, S3Uri.parse("s3://no-such-bucket/units/parts"), files)


def test_only_complete_and_intact_checkpoints_are_resumed(s3, tmp_path, monkeypatch):  # noqa: F811
    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    store = CheckpointStore(storage_for(s3), S3Uri.parse("s3://adapters/units/run/checkpoints"))
    for step in (10, 20):
        folder = tmp_path / f"ckpt-{step}"
        folder.mkdir()
        (folder / "state.json").write_text(json.dumps({"step": step}))
        store.save(folder, step)
    # A newer upload that died before its manifest, and a newest complete one whose file got damaged.
    s3.put("adapters", "units/run/checkpoints/step-30/state.json", b"{}")
    (tmp_path / "ckpt-40").mkdir()
    (tmp_path / "ckpt-40" / "state.json").write_text("{}")
    store.save(tmp_path / "ckpt-40", 40)
    s3.put("adapters", "units/run/checkpoints/step-40/state.json", b"damaged")
    assert store.complete_steps() == [40, 20]  # step 10 was pruned when 40 completed; 30 never did
    path, step = store.restore_latest(tmp_path / "restore")
    assert step == 20 and json.loads((path / "state.json").read_text()) == {"step": 20}
    assert path.name == "checkpoint-20"  # Trainer's own layout, for resume_from_checkpoint


def test_a_folder_goes_up_as_a_set_listed_in_path_order_and_a_missing_file_leaves_no_manifest(
        s3, tmp_path, monkeypatch):  # noqa: F811
    """upload_with_manifest sends the files several at a time: every body arrives intact, the
    entries come back in path order whatever order the uploads finished in, and a file that
    vanished before its turn fails the set before any manifest is written."""
    from qlora_trainer.publishing import UPLOAD_WORKERS, files_under, upload_with_manifest

    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    storage = storage_for(s3)
    folder = tmp_path / "ckpt"
    rng = random.Random(3)
    # Large files first in path order, so the small ones after them finish first.
    bodies = {f"{i:02d}-{'big' if i < UPLOAD_WORKERS else 'small'}.bin":
              rng.randbytes(3 * 1024 * 1024 if i < UPLOAD_WORKERS else 100 + i) for i in range(3 * UPLOAD_WORKERS)}
    bodies["sub/state.json"] = b'{"step": 7}'
    for rel, body in bodies.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(body)
    root = S3Uri.parse("s3://adapters/units/set")
    manifest_body, entries = upload_with_manifest(storage, root, files_under(folder), {"step": 7})
    assert [e.path for e in entries] == sorted(bodies)
    manifest = json.loads(manifest_body)
    assert [f["path"] for f in manifest["files"]] == sorted(bodies)
    for rel, body in bodies.items():
        assert s3.get("adapters", f"units/set/{rel}") == body, rel
        listed = next(f for f in manifest["files"] if f["path"] == rel)
        assert (listed["size"], listed["sha256"]) == (len(body), hashlib.sha256(body).hexdigest())

    files = files_under(folder)
    (folder / "03-big.bin").unlink()  # gone between the listing and its upload
    with pytest.raises(FileNotFoundError, match="03-big.bin"):
        upload_with_manifest(storage, S3Uri.parse("s3://adapters/units/broken"), files, {"step": 8})
    assert "units/broken/manifest.json" not in s3.keys("adapters", "units/broken/")


def test_https_data_is_downloaded_and_a_404_is_bad_data(tmp_path, monkeypatch):
    """An https:// dataset through a real TLS server on 127.0.0.1 (its self-signed CA trusted)."""
    import datetime
    import http.server
    import ipaddress
    import ssl
    import threading

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                         serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    served = tmp_path / "www"
    served.mkdir()
    write_jsonl(served / "chat.jsonl", chat_records(3))

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "cert.pem"))
    try:
        base = f"https://127.0.0.1:{server.server_address[1]}"
        path = fetch_file(f"{base}/chat.jsonl", storage=None, dest_dir=tmp_path / "dl")
        assert [r.shape for r in data.read_file(path, "auto", "auto")] == ["messages"] * 3
        with pytest.raises(FileNotFoundError, match="HTTP 404"):
            fetch_file(f"{base}/missing.jsonl", storage=None, dest_dir=tmp_path / "dl")
    finally:
        server.shutdown()
