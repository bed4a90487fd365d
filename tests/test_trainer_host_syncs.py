"""The training loop reads tensors on the host only at logging steps (benchmarks/NOTES.md, session 7).

Every host read of a tensor value is a GPU sync: the host stops queueing work until the GPU has
run everything before it. The benchmark's loop reads nothing between steps; the HF/trl loop used
to read ~10 values every micro-step (the loss's non-finite check, the token count, trl's metrics).
On a CPU the reads are the same calls, counted here by a TorchFunctionMode.
"""

from collections import Counter

import pytest
from trainer_fixtures.fixtures import tiny_model_dir  # noqa: F401
from trainer_fixtures.host_syncs import train_in_process


@pytest.fixture(scope="module")
def short(tiny_model_dir, tmp_path_factory):  # noqa: F811
    return train_in_process(tiny_model_dir, tmp_path_factory.mktemp("short"), max_steps=2, logging_steps=2,
                            packing=False)


def test_steps_between_logging_steps_read_nothing_on_the_host(tiny_model_dir, tmp_path, short):  # noqa: F811
    # One logging step each; the long run has 4x the micro-steps (8 steps x 2 micro-batches).
    long = train_in_process(tiny_model_dir, tmp_path / "long", max_steps=8, logging_steps=8, packing=False)
    assert (short.steps, long.steps) == (2, 8)
    assert len(short.losses) == len(long.losses) == 1
    loop_reads = Counter(long.reads)
    loop_reads.pop("tolist", None)  # the sampler's shuffled order: a CPU generator, no device involved
    short_reads = Counter(short.reads)
    short_reads.pop("tolist", None)
    # the loss, the grad norm and the token count at the logging step, the loss total at the end
    assert loop_reads == short_reads, (short.reads, long.reads)
    assert sum(loop_reads.values()) <= 6, long.reads
    # the token count is still every non-padding token of every micro-batch
    assert long.tokens > 3 * short.tokens > 0
    assert long.trainer.state.num_input_tokens_seen == long.tokens


def test_the_training_loss_goes_through_the_fast_paths_fused_loss(tiny_model_dir, tmp_path, short):  # noqa: F811
    """trl's LM head called the backbone itself, past the fast path's loss: the fused layers then got
    fresh position_ids every step and never replayed their CUDA graphs (the CLI at 0.66 of the
    benchmark on the 8B row). Every training micro-step must reach the installed loss, with the
    Trainer's token count as its denominator, and learn what trl's head learns."""
    fast = train_in_process(tiny_model_dir, tmp_path, max_steps=2, logging_steps=2, packing=False, fast_loss=True)
    assert fast.fast_loss_calls == 4  # 2 steps x 2 micro-batches
    assert fast.losses == pytest.approx(short.losses, rel=1e-5)
