"""The prefetching loader (checkpoint_prefetch.py) gives the model transformers' folder load gives.

On a GPU it overlaps the checkpoint's host-to-device copies with transformers' per-parameter
Python; here it runs with device "cpu" so that CI exercises the same thread, order and lazy values:
tiny Qwen2 and Llama models saved as safetensors in several shards, NF4 with double quantization,
compared with the folder load tensor for tensor, quant state for quant state.
"""

import json
import threading
import time

import pytest
import torch

SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=256, max_position_embeddings=64)


def _save(tmp_path, family: str, tied: bool):
    import transformers

    torch.manual_seed(0)
    config = getattr(transformers, f"{family}Config")(**SIZES, tie_word_embeddings=tied)
    model = transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    model.generation_config.temperature = 0.7  # something the folder load reads from generation_config.json
    model.generation_config.do_sample = True
    model.save_pretrained(tmp_path, max_shard_size="40KB")  # several shards, with an index
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) >= 3
    return tmp_path


def _kwargs():
    from qlora_api.spec import QuantizationSpec
    from qlora_trainer.model_loading import quantization_config

    quant = QuantizationSpec.model_validate({"computeDtype": "bfloat16", "doubleQuant": True})
    return dict(quantization_config=quantization_config(quant), dtype=torch.bfloat16, device_map={"": "cpu"},
                attn_implementation="sdpa")


def _quant_state_fields(state):
    fields = {"absmax": state.absmax, "code": state.code, "dtype": state.dtype, "shape": state.shape,
              "blocksize": state.blocksize, "quant_type": state.quant_type, "offset": state.offset}
    if state.state2 is not None:
        fields.update(nested_absmax=state.state2.absmax, nested_code=state.state2.code,
                      nested_blocksize=state.state2.blocksize, nested_dtype=state.state2.dtype)
    return fields


def _assert_same_model(a, b):
    import bitsandbytes as bnb

    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert torch.equal(sa[key], sb[key]), key
    linears_a = {n: m for n, m in a.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    linears_b = {n: m for n, m in b.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert linears_a.keys() == linears_b.keys() and len(linears_a) >= 3 * 7  # NF4 really, every projection
    for name, module in linears_a.items():
        qa, qb = module.weight.quant_state, linears_b[name].weight.quant_state
        assert qa.state2 is not None  # double quantization
        fa, fb = _quant_state_fields(qa), _quant_state_fields(qb)
        assert fa.keys() == fb.keys()
        for field, value in fa.items():
            if isinstance(value, torch.Tensor):
                assert value.dtype == fb[field].dtype and torch.equal(value, fb[field]), (name, field)
            else:
                assert value == fb[field], (name, field)
    assert [(n, p.dtype) for n, p in a.named_parameters()] == [(n, p.dtype) for n, p in b.named_parameters()]
    tied_a = a.lm_head.weight is a.model.embed_tokens.weight
    assert tied_a == (b.lm_head.weight is b.model.embed_tokens.weight)
    assert a.config.to_dict() == b.config.to_dict()
    assert a.config.name_or_path == b.config.name_or_path and a.name_or_path == b.name_or_path
    assert a.generation_config.to_dict() == b.generation_config.to_dict()
    return tied_a


@pytest.mark.parametrize("family,tied", [("Qwen2", True), ("Llama", False)])
def test_prefetching_load_equals_the_folder_load(tmp_path, family, tied):
    from qlora_trainer.model_loading import load_prefetching
    from transformers import AutoModelForCausalLM

    folder = _save(tmp_path, family, tied)
    by_folder = AutoModelForCausalLM.from_pretrained(str(folder), **_kwargs())
    prefetched = load_prefetching(folder, _kwargs(), "cpu")
    assert _assert_same_model(prefetched, by_folder) == tied
    assert prefetched.generation_config.temperature == 0.7
    assert not [t for t in threading.enumerate() if t.name == "checkpoint-prefetch"]  # no thread outlives the load


def test_a_missing_shard_is_named(tmp_path):
    from qlora_trainer.errors import TrainerFailure
    from qlora_trainer.model_loading import load_prefetching

    folder = _save(tmp_path, "Llama", False)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    missing = sorted(set(index["weight_map"].values()))[1]
    (folder / missing).unlink()
    with pytest.raises(TrainerFailure, match=missing):
        load_prefetching(folder, _kwargs(), "cpu")


def test_a_truncated_shard_is_named(tmp_path):
    from qlora_trainer.errors import TrainerFailure
    from qlora_trainer.model_loading import load_prefetching

    folder = _save(tmp_path, "Llama", False)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    last = sorted(set(index["weight_map"].values()))[-1]
    data = (folder / last).read_bytes()
    (folder / last).write_bytes(data[: len(data) - 1000])
    with pytest.raises(TrainerFailure, match=last):
        load_prefetching(folder, _kwargs(), "cpu")


@pytest.mark.timeout(60)  # a hang here is the bug under test: fail fast
def test_an_error_in_the_thread_fails_the_load_naming_the_file(tmp_path):
    """An index that sends a tensor to a shard without it: the thread that reads the tensors meets
    the error, and it must surface as the load's error (not a hang), the thread gone."""
    from qlora_trainer.errors import TrainerFailure
    from qlora_trainer.model_loading import load_prefetching

    folder = _save(tmp_path, "Llama", False)
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    key = "model.layers.2.mlp.down_proj.weight"  # late in the load order: the thread reads it
    first = next(f for f in sorted(set(index["weight_map"].values())) if f != index["weight_map"][key])
    index["weight_map"][key] = first
    index_path.write_text(json.dumps(index))
    started = time.monotonic()
    with pytest.raises(TrainerFailure, match=f"{first}: tensor {key}"):
        load_prefetching(folder, _kwargs(), "cpu")
    assert time.monotonic() - started < 30
    assert not [t for t in threading.enumerate() if t.name == "checkpoint-prefetch"]


@pytest.mark.timeout(60)  # a hang here is the bug under test: fail fast
def test_the_thread_reads_ahead_no_more_than_its_bound(tmp_path):
    from qlora_trainer.checkpoint_prefetch import PrefetchedCheckpoint, checkpoint_shards

    folder = _save(tmp_path, "Llama", False)
    shards = checkpoint_shards(folder)
    bound = 40_000  # a few of the tiny model's tensors (the largest, the embeddings, is 32 KB)
    with PrefetchedCheckpoint(shards, "cpu", bound_bytes=bound) as checkpoint:
        values = checkpoint.state_dict()
        for value in values.values():  # a slow consumer: the thread fills its bound and waits
            time.sleep(0.002)
            tensor = value[...]
            assert tensor.shape
        assert 0 < checkpoint.peak_outstanding <= bound
        assert checkpoint.prefetched > len(values) // 2  # it did read ahead
    assert not [t for t in threading.enumerate() if t.name == "checkpoint-prefetch"]


@pytest.mark.timeout(60)  # a hang here is the bug under test: fail fast
def test_an_unused_key_does_not_stall_the_load(tmp_path):
    """A key transformers never asks for holds room in the bound: a later key is read by the asker."""
    from qlora_trainer.checkpoint_prefetch import PrefetchedCheckpoint, checkpoint_shards

    folder = _save(tmp_path, "Llama", False)
    shards = checkpoint_shards(folder)
    with PrefetchedCheckpoint(shards, "cpu", bound_bytes=40_000) as checkpoint:
        values = list(checkpoint.state_dict().items())
        time.sleep(0.2)  # let the thread fill the bound with keys that are then skipped
        for _, value in values[len(values) // 2:]:
            assert value[...].shape
