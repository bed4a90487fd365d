"""Training data: read JSONL/Parquet records, check their shape, tokenize, pack, split off eval.

Three record shapes (one per file, decided by `dataset.recordFormat` or the first record):
  {"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}]}
      rendered with the tokenizer's chat template; with completionOnlyLoss the loss covers the
      assistant turns only (their content and the template's end-of-turn tokens);
  {"prompt": "...", "completion": "..."}
      loss on the completion (+ EOS) only, with completionOnlyLoss;
  {"text": "..."}
      loss on every token (+ EOS).
A record that does not fit its shape (or is not UTF-8 JSON) stops the run with the file and line
(exit 3), before the model is downloaded; one longer than maxSeqLength does too, once the tokenizer
has counted it (before the weights load).

Packing: records are placed into rows of at most maxSeqLength tokens (best-fit decreasing, so
rows are nearly full and no record is split). Each record's position_ids restart at 0 and no
attention mask is passed, so transformers builds a block-diagonal causal mask from the position
resets (`masking_utils.find_packed_sequence_indices`, for sdpa/eager and flash-attention varlen
alike): no token attends to another record. The first token of each record carries no label, so
no record is trained to predict the next record's first token either.
"""

import bisect
import json
import logging
import os
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qlora_api.spec import DatasetSource, TrainingSpec

from qlora_trainer.errors import bad_data
from qlora_trainer.storage import S3Storage, fetch_file

log = logging.getLogger(__name__)

IGNORE = -100  # label of tokens that carry no loss (transformers' convention)
SHAPES = ("messages", "promptCompletion", "text")
ROLES = {"system", "user", "assistant", "tool", "developer"}


@dataclass
class Record:
    where: str  # "train.jsonl line 7": what an error message names
    shape: str
    value: dict[str, Any]


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    position_ids: list[int] = field(default_factory=list)


@dataclass
class Records:
    train: list[Record]
    eval: list[Record]


# -- reading and checking ---------------------------------------------------------------------------


def load_records(source: DatasetSource, storage: S3Storage, workdir: Path, seed: int) -> Records:
    """Download, parse and check the data; carve the eval split off with the seed if none is given."""
    train = read_file(_fetch(source.uri, storage, workdir / "data"), source.format, source.record_format, source.uri)
    if source.eval_uri:
        eval_records = read_file(
            _fetch(source.eval_uri, storage, workdir / "eval-data"), source.format, source.record_format, source.eval_uri
        )
        return Records(train, eval_records)
    return split_eval(train, source.eval_fraction, seed)


def _fetch(uri: str, storage: S3Storage, dest: Path) -> Path:
    try:
        return fetch_file(uri, storage, dest)
    except FileNotFoundError as exc:
        raise bad_data(f"dataset {exc}") from exc


def read_file(path: Path, fmt: str, record_format: str, uri: str = "") -> list[Record]:
    name = (uri or str(path)).rstrip("/").rsplit("/", 1)[-1]
    if fmt == "auto":
        fmt = "parquet" if path.suffix.lower() in (".parquet", ".pq") else "jsonl"
    rows = _parquet_rows(path, name) if fmt == "parquet" else _jsonl_rows(path, name)
    records = []
    shape = None if record_format == "auto" else record_format
    for where, value in rows:
        if shape is None:
            shape = detect_shape(value, where)
        records.append(Record(where, shape, check_record(value, shape, where)))
    if not records:
        empty = path.stat().st_size == 0
        raise bad_data(f"{name}: no records ({'the file is empty' if empty else 'only blank lines'}); "
                       "point spec.dataset.uri at a file with one record per line")
    return records


def _jsonl_rows(path: Path, name: str):
    """(where, value) per non-blank line. Bytes are decoded line by line, so a file in the wrong
    encoding is reported at its first bad line instead of as a decoder traceback."""
    with open(path, "rb") as f:
        _check_encoding(f.read(4), name)
        f.seek(0)
        for number, raw in enumerate(f, 1):
            where = f"{name} line {number}"
            if number == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte order mark is harmless
            if b"\x00" in raw:
                raise bad_data(f"{where}: holds NUL bytes (UTF-16 or a binary file?); save the data as UTF-8 JSONL")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise bad_data(f"{where}: not UTF-8 (byte 0x{raw[exc.start]:02x} at byte {exc.start + 1} of the "
                               "line); save the data as UTF-8") from exc
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except ValueError as exc:
                raise bad_data(f"{where}: not valid JSON ({getattr(exc, 'msg', exc)} at column "
                               f"{getattr(exc, 'colno', '?')})") from exc
            yield where, value


def _check_encoding(head: bytes, name: str) -> None:
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise bad_data(f"{name} line 1: the file is UTF-16 or UTF-32 (it starts with a byte order mark); "
                       "save it as UTF-8")
    if head.startswith(b"\x1f\x8b"):
        raise bad_data(f"{name} line 1: the file is gzip-compressed; store it uncompressed (.jsonl) or as Parquet")
    if head.startswith(b"PAR1"):
        raise bad_data(f"{name} line 1: the file is Parquet; set spec.dataset.format to parquet or name it .parquet")


def _parquet_rows(path: Path, name: str):
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise bad_data(f"{name}: not a readable Parquet file ({exc})") from exc
    for number, value in enumerate(table.to_pylist(), 1):
        yield f"{name} row {number}", value


def detect_shape(value: Any, where: str) -> str:
    if isinstance(value, dict):
        if "messages" in value:
            return "messages"
        if "prompt" in value or "completion" in value:
            return "promptCompletion"
        if "text" in value:
            return "text"
    raise bad_data(f'{where}: expected an object with "messages", "prompt"/"completion" or "text"')


def check_record(value: Any, shape: str, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise bad_data(f"{where}: expected a JSON object, got {type(value).__name__}")
    if shape == "messages":
        messages = value.get("messages")
        if not isinstance(messages, list) or not messages or not all(_is_message(m) for m in messages):
            raise bad_data(f'{where}: "messages" must be a list of {{role, content}}')
        bad_roles = sorted({m["role"] for m in messages} - ROLES)
        if bad_roles:
            raise bad_data(f"{where}: unknown role {bad_roles[0]!r} (expected one of {', '.join(sorted(ROLES))})")
        if not any(m["role"] == "assistant" for m in messages):
            raise bad_data(f'{where}: "messages" has no assistant turn to learn from')
        return {"messages": [{"role": m["role"], "content": m["content"]} for m in messages]}
    if shape == "promptCompletion":
        for key in ("prompt", "completion"):
            if not isinstance(value.get(key), str):
                raise bad_data(f'{where}: "{key}" must be a string')
        if not value["completion"]:
            raise bad_data(f'{where}: "completion" is empty')
        return {"prompt": value["prompt"], "completion": value["completion"]}
    if shape == "text":
        if not isinstance(value.get("text"), str) or not value["text"]:
            raise bad_data(f'{where}: "text" must be a non-empty string')
        return {"text": value["text"]}
    raise bad_data(f"{where}: unknown record format {shape!r}")


def _is_message(m: Any) -> bool:
    return isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)


def split_eval(records: list[Record], fraction: float, seed: int) -> Records:
    """A fixed-seed eval split: the same records on every attempt, so a resumed run sees the same data."""
    if fraction <= 0 or len(records) < 2:
        return Records(records, [])
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_eval = min(len(records) - 1, max(1, round(len(records) * fraction)))
    held_out = set(order[:n_eval])
    return Records(
        [r for i, r in enumerate(records) if i not in held_out],
        [r for i, r in enumerate(records) if i in held_out],
    )


# -- tokenizing ---------------------------------------------------------------------------------------


ENCODE_BATCH = 8192  # records per tokenizer call: the per-call overhead amortised, the batch's memory bounded


def tokenize(record: Record, tokenizer, completion_only: bool) -> Example:
    return tokenize_all([record], tokenizer, completion_only)[0]


def tokenize_all(records: list[Record], tokenizer, completion_only: bool) -> list[Example]:
    """Every record's Example, in order, with one batched tokenizer call per field and shape.

    A call per record pays the tokenizer's per-call overhead (argument checks, BatchEncoding, the
    trip into the Rust tokenizer) thousands of times: 8x a batched pass on the first H200 run. The
    ids are the same: without padding or truncation a batch encodes each text on its own."""
    out: list[Example | None] = [None] * len(records)
    by_shape: dict[str, list[int]] = {}
    for i, record in enumerate(records):
        by_shape.setdefault(record.shape, []).append(i)
    for shape, where in by_shape.items():
        group = [records[i] for i in where]
        if shape == "messages":
            pairs = _tokenize_chats(group, tokenizer, completion_only)
        elif shape == "promptCompletion":
            prompts = _encode(tokenizer, [r.value["prompt"] for r in group], add_special_tokens=True)
            completions = _encode(tokenizer, [r.value["completion"] for r in group], add_special_tokens=False)
            pairs = []
            for prompt, completion in zip(prompts, completions):
                completion = _with_eos(completion, tokenizer)
                pairs.append((prompt + completion,
                              ([IGNORE] * len(prompt) if completion_only else list(prompt)) + completion))
        else:
            texts = _encode(tokenizer, [r.value["text"] for r in group], add_special_tokens=True)
            pairs = [(ids, list(ids)) for ids in (_with_eos(t, tokenizer) for t in texts)]
        for i, (ids, labels) in zip(where, pairs):
            if labels:
                labels[0] = IGNORE  # nothing predicts a record's first token (see the module docstring)
            out[i] = Example(ids, labels)
    return out


def _encode(tokenizer, texts: list[str], add_special_tokens: bool, offsets: bool = False):
    """input_ids (and offset mappings when asked) of every text, ENCODE_BATCH texts per call, on
    the tokenizer's own threads (tokenizer_threads)."""
    ids, spans = [], []
    with tokenizer_threads():
        for start in range(0, len(texts), ENCODE_BATCH):
            encoded = tokenizer(texts[start:start + ENCODE_BATCH], add_special_tokens=add_special_tokens,
                                return_offsets_mapping=offsets)
            ids += encoded["input_ids"]
            if offsets:
                spans += encoded["offset_mapping"]
    return (ids, spans) if offsets else ids


PARALLELISM = "TOKENIZERS_PARALLELISM"


@contextmanager
def tokenizer_threads() -> Iterator[None]:
    """The fast tokenizer's thread pool on for a batched pass, whatever the environment says, and
    the environment as it was afterwards.

    The trainer image sets TOKENIZERS_PARALLELISM=false: a process that forks after the pool has
    run gets a warning on every fork, and a child that tokenized would deadlock on the pool's
    copied locks. It also made the tokenize phase one thread, and nearly all of the phase is this
    call: on the H200 machine's 16 cores the 1.5B row's texts took 1.88 s on one thread and 0.17 s
    on the pool; the phase went from 14.5x that floor to 1.27x
    (benchmarks/results/trainer_cli_speed_h200.md).

    The Rust library reads the variable at every batch call, so the pool runs for this pass only,
    and with the variable back to "false" a later fork neither warns nor lets a child use the pool.
    The ids do not depend on it: each text is encoded on its own either way."""
    before = os.environ.get(PARALLELISM)
    os.environ[PARALLELISM] = "true"
    try:
        yield
    finally:
        if before is None:
            del os.environ[PARALLELISM]
        else:
            os.environ[PARALLELISM] = before


def _with_eos(ids: list[int], tokenizer) -> list[int]:
    eos = tokenizer.eos_token_id
    return ids + [eos] if eos is not None and (not ids or ids[-1] != eos) else ids


def _tokenize_chats(records: list[Record], tokenizer, completion_only: bool) -> list[tuple[list[int], list[int]]]:
    """Rendered one by one (the template's errors name the record), tokenized in batches."""
    texts, spans = [], []
    for record in records:
        messages = record.value["messages"]
        try:
            texts.append(tokenizer.apply_chat_template(messages, tokenize=False))
            spans.append(_assistant_spans(messages, tokenizer, texts[-1]) if completion_only else None)
        except Exception as exc:  # jinja's raise_exception (e.g. roles must alternate) and template bugs
            raise bad_data(f"{record.where}: the chat template rejected the messages: {exc}") from exc
    offsets = any(s is not None for s in spans)
    encoded = _encode(tokenizer, texts, add_special_tokens=False, offsets=offsets)
    all_ids, all_offsets = encoded if offsets else (encoded, [None] * len(texts))
    pairs = []
    for ids, record_spans, token_offsets in zip(all_ids, spans, all_offsets):
        if record_spans is None:
            pairs.append((ids, list(ids)))
            continue
        pairs.append((ids, [
            token if any(start < end_ and end > start_ for start_, end_ in record_spans) else IGNORE
            for token, (start, end) in zip(ids, token_offsets)
        ]))
    return pairs


def _assistant_spans(messages, tokenizer, text: str) -> list[tuple[int, int]] | None:
    """Character spans of the assistant turns in the rendered conversation.

    Rendering the conversation up to each assistant turn (with the generation prompt) and up to its
    end gives the turn's span, as long as the template renders prefixes as prefixes. Templates that
    rewrite earlier turns (e.g. dropping reasoning) do not; such records train on every token.
    """
    if not tokenizer.is_fast:
        return None
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
        through = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (text.startswith(before) and text.startswith(through) and len(before) < len(through)):
            _warn_once("the chat template does not render prefixes stably; training on whole conversations")
            return None
        spans.append((len(before), len(through)))
    return spans


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning(message)


# -- packing and batching -------------------------------------------------------------------------------


def build_examples(records: list[Record], tokenizer, spec: TrainingSpec, split: str) -> list[Example]:
    """Tokenize, refuse records longer than maxSeqLength, drop records left with nothing to learn, and pack.

    A record longer than maxSeqLength is bad data for this job rather than something to cut
    silently: the cut would drop the end of an answer (and its end-of-turn token), which the model
    would then learn never to say. The message names the record and the length that fits it."""
    if any(r.shape == "messages" for r in records[:1]) and not tokenizer.chat_template:
        raise bad_data(f"{records[0].where}: chat records need a tokenizer with a chat template; this model has none")
    examples, too_long, dropped = [], [], 0
    for record, example in zip(records, tokenize_all(records, tokenizer, spec.completion_only_loss)):
        if len(example.input_ids) > spec.max_seq_length:
            too_long.append((record.where, len(example.input_ids)))
            continue
        if all(label == IGNORE for label in example.labels):
            dropped += 1
            continue
        examples.append(example)
    if too_long:
        (where, length), longest = too_long[0], max(n for _, n in too_long)
        others = f" (and {len(too_long) - 1} more record(s), the longest {longest} tokens)" if len(too_long) > 1 else ""
        raise bad_data(f"{where}: {length} tokens, longer than spec.training.maxSeqLength {spec.max_seq_length}"
                       f"{others}; create the QLoRAJob with maxSeqLength {longest} or more (within the model's "
                       "context), or shorten or split the record")
    if dropped:
        log.warning("%s: %d record(s) with no completion tokens dropped", split, dropped)
    if not examples:
        raise bad_data(f"{split} data: no record has tokens to learn from within maxSeqLength={spec.max_seq_length}")
    rows = pack(examples, spec.max_seq_length) if spec.packing else [_single(e) for e in examples]
    tokens = sum(len(e.input_ids) for e in examples)
    log.info("%s: %d records, %d tokens, %d rows of at most %d tokens%s", split, len(examples), tokens, len(rows),
             spec.max_seq_length, " (packed)" if spec.packing else "")
    return rows


def _single(example: Example) -> Example:
    return Example(example.input_ids, example.labels, list(range(len(example.input_ids))))


def pack(examples: list[Example], capacity: int) -> list[Example]:
    """Best-fit decreasing: each record (longest first) goes into the fullest row it still fits."""
    rows: list[Example] = []
    free: list[tuple[int, int]] = []  # (space left, row index), sorted
    for example in sorted(examples, key=lambda e: len(e.input_ids), reverse=True):
        n = len(example.input_ids)
        i = bisect.bisect_left(free, (n, -1))
        if i < len(free):
            space, row_index = free.pop(i)
        else:
            rows.append(Example([], [], []))
            space, row_index = capacity, len(rows) - 1
        row = rows[row_index]
        row.input_ids += example.input_ids
        row.labels += example.labels
        row.position_ids += range(n)
        if space - n > 0:
            bisect.insort(free, (space - n, row_index))
    return rows


def to_dataset(rows: list[Example]):
    from datasets import Dataset

    return Dataset.from_dict({
        "input_ids": [r.input_ids for r in rows],
        "labels": [r.labels for r in rows],
        "position_ids": [r.position_ids for r in rows],
    })


def check_token_ids(input_ids, labels, vocab_size: int) -> None:
    """Raise a BadData TrainerFailure when a batch's token ids or labels ([rows][positions], lists
    or arrays) fall outside the model's vocabulary (0..vocab_size-1; labels may also be IGNORE). On
    the host, before the batch goes to the GPU: there an out-of-range id stops the process with a
    device-side assert in the embedding, and checking labels on the GPU made the host wait for it
    at every micro-step. In numpy, not torch: no tensor is read back, on any device."""
    import numpy as np

    for name, values, allowed in (("token id", input_ids, None), ("label", labels, IGNORE)):
        t = np.asarray(values)
        t = t.reshape(-1, t.shape[-1])  # [rows, positions]
        bad = (t < 0) | (t >= vocab_size)
        if allowed is not None:
            bad &= t != allowed
        if bad.any():
            row, col = (int(i) for i in np.argwhere(bad)[0])
            ignore = f", or {IGNORE} to ignore" if allowed is not None else ""
            raise bad_data(f"{name} {int(t[row, col])} (row {row}, position {col}) is outside the model's "
                           f"vocabulary (0..{vocab_size - 1}{ignore}): was the data tokenized for another model?")


@dataclass
class Collator:
    """Pads a batch of rows. Packed rows get no attention mask (see the module docstring); the
    padding is a segment of its own (positions restart at 0) with no labels. Unpacked rows get a
    mask only when one of them is padded. With `vocab_size`, every batch's ids and labels are
    checked against it (check_token_ids)."""

    pad_token_id: int
    packed: bool
    pad_to_multiple_of: int = 8
    vocab_size: int | None = None

    def __call__(self, rows: list[dict]) -> dict:
        import torch

        longest = max(len(r["input_ids"]) for r in rows)
        length = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        ids, labels, positions, mask = [], [], [], []
        for r in rows:
            pad = length - len(r["input_ids"])
            ids.append(list(r["input_ids"]) + [self.pad_token_id] * pad)
            labels.append(list(r["labels"]) + [IGNORE] * pad)
            positions.append(list(r["position_ids"]) + list(range(pad)))
            mask.append([1] * len(r["input_ids"]) + [0] * pad)
        if self.vocab_size is not None:
            check_token_ids(ids, labels, self.vocab_size)
        batch = {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)}
        if self.packed:
            batch["position_ids"] = torch.tensor(positions)
        elif any(len(r["input_ids"]) < length for r in rows):
            batch["attention_mask"] = torch.tensor(mask)
        # else every row is full: an all-ones mask means no mask to a causal model, and without one
        # the fast path sees fixed-length rows (static record boundaries: its CUDA graphs apply)
        # and transformers need not read the mask on the host to find that it masks nothing
        return batch
