"""How many GPUs a job needs, decided before any weights download (acceleration/sharded_plan.py and
trainer_hooks.plan_layout): data parallel when the one-GPU plan fits, sharded when only sharding
fits, and a job that fits neither way fails with the smallest GPU count that would hold it. Also
what training_config.json says about CUDA graphs under data parallel (on, unless under DDP).

A Llama-3-70B shape on 48 GB cards: its 4-bit weights, embeddings and bf16 adapter (~38.3 GiB) leave
the one-GPU lean plan room for 1024 tokens (every layer recomputed, its input offloaded: the seed's
headline), not for 2048; two GPUs hold it sharded at 2048 tokens, three at 4096.
"""

import json

import pytest
from qlora_api import ExitCode, QLoRAJobSpec, TrainerError
from qlora_trainer.acceleration import GIB, GpuSpec, JobShape, ModelShape, PlanDoesNotFit, plan_memory
from qlora_trainer.acceleration.sharded_plan import (
    does_not_fit_message,
    load_peak_bytes,
    plan_sharded,
    sharded_peak_bytes,
    smallest_sharded_world,
)
from qlora_trainer.acceleration.sharded_plan import fits as sharded_fits
from support.objects import MINIMAL_SPEC
from trainer_fixtures.fixtures import colour_data, s3  # noqa: F401

LLAMA3_70B = dict(model_type="llama", num_hidden_layers=80, hidden_size=8192, intermediate_size=28672,
                  num_attention_heads=64, num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192)
CARD = GpuSpec(memory_bytes=48 * 10**9, name="48 GB card")
CARD_GIB = 48e9 / GIB


def shape70() -> ModelShape:
    return ModelShape.from_hf_config(LLAMA3_70B)


def test_the_sharded_peak_falls_with_the_world_and_the_load_does_not():
    job = JobShape(seq_len=1024, micro_batch=1, grad_accum=4)
    peaks = [sharded_peak_bytes(shape70(), job, n)[0] for n in (1, 2, 4, 8)]
    assert peaks == sorted(peaks, reverse=True) and peaks[0] > 2 * peaks[-1]
    # 1/N of the weights: halving the shards is most of what one more doubling saves
    assert peaks[1] - peaks[2] == pytest.approx((peaks[0] - peaks[1]) / 2, rel=0.02)
    assert plan_sharded(shape70(), job, CARD, 2).load_peak_bytes == plan_sharded(shape70(), job, CARD, 8).load_peak_bytes


def test_70b_fits_one_48_gb_card_at_1024_tokens_with_the_lean_plan():
    plan = plan_memory(shape70(), JobShape(seq_len=1024, micro_batch=1, grad_accum=4), CARD)
    assert (plan.policy, plan.recompute, plan.micro_batch) == ("lean", "offload", 1)
    assert plan.predicted_peak_bytes <= plan.budget_bytes
    # the adapter in bf16 with AdamW's moments (8 bytes a parameter), and an offloaded layer holds one
    # dequantized matrix (gate|up), not the whole layer: the two terms that once refused this job
    assert plan.breakdown["lora_and_optimizer"] == shape70().lora_params(16) * 8
    assert plan.breakdown["dequant_buffer"] == 2 * 8192 * 28672 * 2


def test_70b_on_48_gb_cards_needs_sharding_and_the_smallest_count_follows_the_sequence_length():
    short, long = JobShape(seq_len=2048, micro_batch=1, grad_accum=4), JobShape(seq_len=4096, micro_batch=1, grad_accum=4)
    with pytest.raises(PlanDoesNotFit):
        plan_memory(shape70(), short, CARD)
    assert smallest_sharded_world(shape70(), short, CARD) == 2
    assert sharded_fits(plan_sharded(shape70(), short, CARD, 2))
    assert smallest_sharded_world(shape70(), long, CARD) == 3
    assert not sharded_fits(plan_sharded(shape70(), long, CARD, 2)) and sharded_fits(plan_sharded(shape70(), long, CARD, 3))
    message = does_not_fit_message(shape70(), long, CARD, 2, "one-GPU reason")
    assert "does not fit on 2 x 48 GB card" in message and "the smallest count that fits is 3 GPUs" in message


def test_no_count_fits_when_the_load_or_the_activations_exceed_one_gpu():
    job = JobShape(seq_len=1024, micro_batch=1, grad_accum=1)
    small_card = GpuSpec(memory_bytes=24 * GIB, name="24 GiB card")
    assert load_peak_bytes(shape70(), job) > 24 * GIB * 0.92 - GIB
    assert smallest_sharded_world(shape70(), job, small_card) is None
    assert "must hold the whole 4-bit model" in does_not_fit_message(shape70(), job, small_card, 8, "x")
    huge = JobShape(seq_len=8192, micro_batch=8, grad_accum=1)  # 65k tokens of fp32 logits: no split helps
    assert smallest_sharded_world(shape70(), huge, CARD) is None
    assert "activations alone" in does_not_fit_message(shape70(), huge, CARD, 2, "x")


# -- trainer_hooks.plan_layout: the decision the trainer makes before the weights download ------------

@pytest.fixture
def config_dir(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(**{k: v for k, v in LLAMA3_70B.items() if k != "model_type"}).save_pretrained(tmp_path)
    return tmp_path


@pytest.fixture
def card_48gb(monkeypatch):
    """The planner's pretend GPU on a CPU: QLORA_ACCELERATION=cpu with a 48 GB card."""
    monkeypatch.setenv("QLORA_ACCELERATION", "cpu")
    monkeypatch.setenv("QLORA_CPU_PLAN_GIB", str(CARD_GIB))


def spec(seq: int, parallelism: str = "auto") -> QLoRAJobSpec:
    return QLoRAJobSpec.model_validate({**MINIMAL_SPEC, "training": {
        "maxSeqLength": seq, "batchSize": 1, "gradientAccumulationSteps": 4, "parallelism": parallelism}})


def test_auto_shards_what_only_sharding_fits_and_keeps_data_parallel_otherwise(config_dir, card_48gb, tmp_path):
    from qlora_trainer.acceleration.trainer_hooks import plan_layout
    from transformers import LlamaConfig

    layout = plan_layout(config_dir, spec(2048), world_size=2)
    assert layout.mode == "sharded" and layout.sharded.world == 2 and "one-GPU plan does not fit" in layout.why
    small = tmp_path / "small"
    LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=8192).save_pretrained(small)
    assert plan_layout(small, spec(1024), world_size=2).mode == "dataParallel"
    assert plan_layout(small, spec(1024, "sharded"), world_size=2).mode == "sharded"  # asked for: sharded anyway
    assert plan_layout(small, spec(1024, "sharded"), world_size=1).mode == "single"  # one process: nothing to shard


@pytest.mark.parametrize(("parallelism", "said"), [
    ("auto", "the smallest count that fits is 3 GPUs"),
    ("sharded", "the smallest count that fits is 3 GPUs"),
    ("dataParallel", "data parallel needs the one-GPU plan to fit"),
])
def test_a_job_no_layout_of_its_gpus_holds_fails_with_what_would(config_dir, card_48gb, parallelism, said):
    from qlora_trainer.acceleration.trainer_hooks import plan_layout
    from qlora_trainer.errors import TrainerFailure

    with pytest.raises(TrainerFailure) as caught:
        plan_layout(config_dir, spec(4096, parallelism), world_size=2)
    failure = caught.value
    assert (failure.exit_code, failure.reason) == (ExitCode.OUT_OF_MEMORY, "DoesNotFit")
    assert not failure.exit_code.retryable
    assert said in failure.message
    if parallelism == "dataParallel":
        assert "sharded (spec.training.parallelism: sharded) it would fit on 3 GPUs" in failure.message


# -- the same through the real CLI, two ranks: before a single safetensors byte is downloaded ---------

@pytest.mark.slow
def test_the_trainer_refuses_a_job_its_gpus_cannot_hold_before_downloading_weights(s3, colour_data, tmp_path):  # noqa: F811
    from trainer_fixtures.runs import TrainerProcess, run_config, trainer_env
    from transformers import LlamaConfig

    folder = tmp_path / "llama-70b-config"
    LlamaConfig(**{k: v for k, v in LLAMA3_70B.items() if k != "model_type"}).save_pretrained(folder)
    s3.put("models", "llama-70b-shape/config.json", (folder / "config.json").read_bytes())
    # 140 GB of weights stand behind this name in real life; here a few bytes that no loader accepts
    s3.put("models", "llama-70b-shape/model.safetensors", b"not downloaded: the plan refuses first")
    config = run_config(s3, "s3://models/llama-70b-shape/", colour_data["train"], "run-too-big",
                        training={"maxSeqLength": 4096, "batchSize": 1, "gradientAccumulationSteps": 4})
    env = trainer_env(s3, QLORA_ACCELERATION="cpu", QLORA_CPU_PLAN_GIB=str(CARD_GIB), OMP_NUM_THREADS="1")
    proc = TrainerProcess(tmp_path / "run", config, env, extra_args=["--nproc-per-node", "2"])
    assert proc.wait(300) == ExitCode.OUT_OF_MEMORY, proc.log_tail()
    error = proc.termination
    assert isinstance(error, TrainerError) and error.reason == "DoesNotFit", proc.termination_text
    assert "does not fit on 2 x" in error.message and "the smallest count that fits is 3 GPUs" in error.message
    scratch = tmp_path / "run" / "scratch"
    # the rank that refused read the config (whichever got there first: the launcher stops the
    # others, which may not have reached the model yet), and no rank fetched a weight
    assert sorted(p.parent.parent.name for p in scratch.glob("rank-*/model/config.json"))
    assert sorted(p.name for p in scratch.rglob("*.safetensors")) == []


# -- what training_config.json says ran -------------------------------------------------------------

def test_training_config_says_cuda_graphs_stay_on_under_data_parallel_and_off_under_ddp(monkeypatch):
    from qlora_api import TrainerRunConfig
    from qlora_trainer import distributed, sft
    from qlora_trainer.acceleration import plan_memory as plan
    from qlora_trainer.acceleration.trainer_hooks import Layout, for_data_parallel

    cfg = TrainerRunConfig.model_validate({"namespace": "team-a", "name": "x", "runId": "r", "spec": MINIMAL_SPEC})
    one_gpu = plan(ModelShape.from_hf_config(LLAMA3_70B | {"num_hidden_layers": 2}),
                   JobShape(seq_len=512, micro_batch=1, grad_accum=2), GpuSpec(80 * GIB), packing=False)
    assert one_gpu.cuda_graphs
    import torch

    single = sft.resolved_config(cfg, torch.float32, None, one_gpu, distributed.ONE_PROCESS, Layout("single", one_gpu))
    assert single["resolved"]["acceleration"]["cudaGraphs"] is True
    world = distributed.World(0, 0, 2)
    # data parallel on the fast path: the step's own all-reduce (gradient_sync.py), graphs as planned
    from qlora_trainer.acceleration.trainer_hooks import gradient_sync_mode

    sync = gradient_sync_mode(one_gpu, world.distributed)
    assert sync == "allReduceAfterStep" and for_data_parallel(one_gpu, world.distributed) is one_gpu
    dp = sft.resolved_config(cfg, torch.float32, None, one_gpu, world, Layout("dataParallel", one_gpu), sync)
    assert dp["resolved"]["acceleration"]["cudaGraphs"] is True
    assert dp["resolved"]["parallelism"]["gradients"] == "allReduceAfterStep"
    # the plain recipe (no plan) runs under DDP; so does the fast path with QLORA_GRADIENT_SYNC=ddp,
    # and then without CUDA graphs
    assert gradient_sync_mode(None, True) == "ddp" and gradient_sync_mode(one_gpu, False) is None
    monkeypatch.setenv("QLORA_GRADIENT_SYNC", "ddp")
    as_run = for_data_parallel(one_gpu, world.distributed)
    ddp = sft.resolved_config(cfg, torch.float32, None, as_run, world, Layout("dataParallel", as_run),
                              gradient_sync_mode(one_gpu, world.distributed))
    acceleration = ddp["resolved"]["acceleration"]
    assert acceleration["cudaGraphs"] is False and "data parallel: CUDA graphs off" in acceleration["why"]
    assert "no CUDA graphs" in ddp["resolved"]["memoryPlan"]
    json.dumps(ddp)  # it is what training_config.json holds
