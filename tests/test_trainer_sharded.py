"""Sharded training on the CPU: the real CLI launches 2 trainer processes through torchrun (gloo)
with spec.training.parallelism sharded; FSDP2 splits the NF4 base (stored as float32 bytes), the
LoRA adapter and its optimizer state across them. They train the loss curve of one process with the
same effective batch, across a stop and resume from the sharded checkpoint (gathered LoRA weights
and optimizer state), and publish once. Three runs in all, to keep the file short on CI's 2 cores.

Tolerance, as in test_trainer_data_parallel.py: both runs see the same rows in the same order (the
spec's 2 x 4 effective batch is 2 x 2 on each of 2 ranks), dropout is 0 and everything is float32,
so only the order of gradient summation differs (per rank, then reduce-scattered and averaged).
Measured here: 2.9e-4 relative at most over 8 steps, with and without a resume. 1e-3 is above that and far below what a wrong shard
(a rank training on another's weights), a doubled or halved gradient or a lost optimizer state on
resume does: each moves the curve by more than 1e-2 within two steps.
"""

import json
import re
import signal

import pytest
from qlora_api import ExitCode, TrainerError, TrainerResultMessage
from trainer_fixtures.fixtures import s3, tiny_model_dir, tiny_model_uri  # noqa: F401
from trainer_fixtures.runs import TrainerProcess, jsonl, published_manifests, run_config, trainer_env
from trainer_fixtures.tiny_model import chat_records

pytestmark = pytest.mark.slow

# Constant schedule after warm-up, so a resumed run's steps match an uninterrupted one's; torch's
# AdamW in both (the sharded run would turn the paged optimizer into fused AdamW).
TRAINING = {"maxSteps": 8, "batchSize": 2, "gradientAccumulationSteps": 4, "loggingSteps": 1,
            "checkpointSteps": 2, "warmupSteps": 2, "scheduler": "constant_with_warmup",
            "optimizer": "adamw_torch", "parallelism": "sharded"}
RELATIVE = 1e-3


def start(s3, model_uri, data_uri, tmp_path, run_id: str, nproc: int) -> TrainerProcess:  # noqa: F811
    config = run_config(s3, model_uri, data_uri, run_id, training=TRAINING)
    env = trainer_env(s3, OMP_NUM_THREADS="1")  # no QLORA_ACCELERATION: the plain recipe, as sharded runs
    return TrainerProcess(tmp_path / run_id, config, env, extra_args=["--nproc-per-node", str(nproc)])


def checkpoints(s3, run_id):  # noqa: F811
    prefix = f"adapters/team-a/colours/{run_id}/checkpoints/"
    return sorted(int(m.group(1)) for k in s3.keys("adapters", prefix)
                  if (m := re.match(re.escape(prefix) + r"step-(\d+)/manifest\.json$", k)))


@pytest.fixture(scope="module")
def train_uri(s3):  # noqa: F811
    return s3.put("datasets", "colours/train-sharded.jsonl", jsonl(chat_records(800, seed=3)))


@pytest.fixture(scope="module")
def runs(s3, tiny_model_uri, train_uri, tmp_path_factory):  # noqa: F811
    """One process to the end; a sharded group of two stopped by SIGTERM after its first complete
    checkpoint; the same group started again, which resumes from that checkpoint and publishes."""
    tmp = tmp_path_factory.mktemp("sharded")
    one = start(s3, tiny_model_uri, train_uri, tmp, "run-sh1", 1)
    assert one.wait(600) == 0, one.log_tail()
    first = start(s3, tiny_model_uri, train_uri, tmp / "pod-1", "run-sh2", 2)
    first.wait_for(lambda: checkpoints(s3, "run-sh2"), timeout=300, what="a complete checkpoint")
    first.proc.send_signal(signal.SIGTERM)
    assert first.wait(120) == ExitCode.INTERRUPTED, first.log_tail()
    stopped = max(checkpoints(s3, "run-sh2"))
    # what the stopped group left (a published run clears its checkpoints)
    files = {k.rsplit("/", 1)[1] for k in s3.keys("adapters", f"adapters/team-a/colours/run-sh2/checkpoints/step-{stopped}/")}
    second = start(s3, tiny_model_uri, train_uri, tmp / "pod-2", "run-sh2", 2)
    assert second.wait(600) == 0, second.log_tail()
    return {"one": one, "first": first, "second": second, "stopped": stopped, "checkpoint_files": files}


def test_two_sharded_processes_train_the_loss_curve_of_one_across_a_resume(runs):
    one, first, second = runs["one"].losses, runs["first"].losses, runs["second"].losses
    assert sorted(one) == list(range(1, 9))
    stopped = runs["stopped"]
    assert 2 <= stopped < 8 and max(first) >= stopped
    resumed = int(re.search(r"resuming from checkpoint step (\d+)", "\n".join(runs["second"].stderr)).group(1))
    assert resumed == stopped and min(second) == stopped + 1 and max(second) == 8
    # Before the stop: sharded against one process. After it: the resumed group, whose LoRA weights
    # and Adam state came back from the gathered checkpoint (a fresh Adam would depart at once).
    curve = {**{s: v for s, v in first.items() if s <= stopped}, **second}
    assert sorted(curve) == list(range(1, 9))
    print("sharded vs one process, largest relative difference:",
          max(abs(curve[s] - one[s]) / abs(one[s]) for s in one))
    for step in one:
        assert curve[step] == pytest.approx(one[step], rel=RELATIVE), json.dumps([step, one, curve])
    assert one[8] < 0.8 * one[1]  # it learns
    log = "\n".join(runs["first"].stderr)
    assert "sharded over 2 ranks (FSDP2)" in log and "NF4 weights flat-sharded as torch.float32" in log
    assert "sharded over" not in "\n".join(runs["one"].stderr)  # one process: nothing to shard


def test_the_sharded_checkpoint_holds_the_gathered_adapter_and_optimizer(s3, runs):  # noqa: F811
    names = runs["checkpoint_files"]
    assert {"adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state_0.pth", "rng_state_1.pth"} <= names
    assert isinstance(runs["first"].termination, TrainerError)


def test_the_sharded_run_publishes_once_with_what_ran(s3, runs):  # noqa: F811
    assert published_manifests(s3, "run-sh2") == ["adapters/team-a/colours/run-sh2/manifest.json"]
    assert isinstance(runs["second"].termination, TrainerResultMessage), runs["second"].termination_text
    config = json.loads(s3.get("adapters", "adapters/team-a/colours/run-sh2/training_config.json"))
    resolved = config["resolved"]
    assert resolved["worldSize"] == 2 and resolved["parallelism"]["mode"] == "sharded"
    assert resolved["acceleration"] == {"path": "plain", "cudaGraphs": False,
                                        "why": "sharded (FSDP2 over NF4): the plain recipe"}
    # The published adapter is whole (gathered), the same tensors as one process writes, and close to
    # its values: the same training, summed in another order. The LoRA weights are bf16 (SFTTrainer
    # casts a quantized model's adapter to bf16), so that order flips last bits (one bf16 step is 0.4% of
    # a value), and Adam's normalised steps (lr 1e-2) carry a flip on: the tensors differ by 2% at
    # most (norm of the difference against the norm); a shard written in the wrong place or left out
    # differs by the whole value (100% or more).
    from safetensors.torch import load

    sharded = load(s3.get("adapters", "adapters/team-a/colours/run-sh2/adapter_model.safetensors"))
    single = load(s3.get("adapters", "adapters/team-a/colours/run-sh1/adapter_model.safetensors"))
    assert sharded.keys() == single.keys() and len(sharded) > 0
    for name in single:
        assert sharded[name].shape == single[name].shape
        a, b = sharded[name].float(), single[name].float()
        assert (a - b).norm() <= 0.02 * b.norm(), (name, float((a - b).norm() / b.norm()))
