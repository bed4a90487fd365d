"""The speed benchmark's training loop (benchmarks/speed_vs_unsloth.py train_steps): the losses it
returns are the ones a plain loop computes on the same batches, per step, in both loss modes, and
every step is timed. CPU only (a tiny Llama); the CUDA path differs only in where it waits."""

from pathlib import Path

import pytest
from support.benchmarks import load_benchmark

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


def _bench():
    return load_benchmark("speed_vs_unsloth")


def _model():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config)


def _reference(model, opt, make, steps, items):
    """The loop the benchmark's must equal: forward and backward per micro-batch, clip, step."""
    params = [p for p in model.parameters() if p.requires_grad]
    losses = []
    for step in range(steps):
        batches = make(step)
        n_items = sum(int((b["labels"][..., 1:] != -100).sum()) for b, _ in batches)
        total = 0.0
        for kwargs, _ in batches:
            loss = (model(**kwargs, num_items_in_batch=n_items) if items else model(**kwargs)).loss
            loss.backward()
            total += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(params, 0.3)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total / (1 if items else len(batches)))
    return losses


@pytest.mark.parametrize("items", [True, False])
def test_train_steps_losses_match_a_plain_loop(items):
    bench = _bench()
    steps, micro, seq, accum = 3, 2, 8, 3
    make = bench._fixed_batches(64, micro, seq, accum)

    model = _model()
    params, opt = bench.make_optimizer(model, device="cpu")
    times, losses, tokens = bench.train_steps(model, params, opt, make, steps, device="cpu", autocast=False,
                                              items=items)

    ref_model = _model()
    ref_opt = bench.make_optimizer(ref_model, device="cpu")[1]
    expected = _reference(ref_model, ref_opt, make, steps, items)

    assert losses == pytest.approx(expected, rel=1e-5)
    assert len(set(round(x, 4) for x in losses)) == steps  # the steps trained: each loss differs
    assert tokens == [micro * seq * accum] * steps
    assert len(times) == steps and all(t > 0 for t in times)
    assert len(bench.train_steps.optimizer_seconds) == steps
    assert all(0 < o <= t for o, t in zip(bench.train_steps.optimizer_seconds, times))
