"""The pure parts of data parallel: how the spec's effective batch is split over ranks, torchrun's
command line, and which rank's message explains a group's end."""

import json
import time

import pytest
from qlora_api import ExitCode, TrainerError
from qlora_api.protocol import parse_termination_message
from qlora_api.spec import TrainingSpec
from qlora_trainer.distributed import World, per_rank_training
from qlora_trainer.launcher import RANK_DONE, node_outcome, rank_message_path, torchrun_args


@pytest.mark.parametrize(("batch", "accum", "n", "per_rank", "effective"), [
    (4, 8, 2, (4, 4), 32),  # accumulation divides: the per-GPU micro-batch stays the spec's
    (4, 8, 8, (4, 1), 32),
    (4, 3, 2, (2, 3), 12),  # it does not, the micro-batch does
    (3, 3, 2, (3, 3), 18),  # neither: every rank runs the spec's settings, the effective batch grows
    (4, 8, 1, (4, 8), 32),
])
def test_ranks_share_the_specs_effective_batch(batch, accum, n, per_rank, effective):
    spec = TrainingSpec(batch_size=batch, gradient_accumulation_steps=accum)
    planned = per_rank_training(spec, World(rank=0, local_rank=0, size=n))
    assert (planned.batch_size, planned.gradient_accumulation_steps) == per_rank
    assert planned.batch_size * planned.gradient_accumulation_steps * n == effective


def test_world_comes_from_torchruns_environment():
    assert World.from_env({"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8"}) == World(5, 1, 8)
    assert not World.from_env({}).distributed and World.from_env({}).is_main


def test_torchrun_command_lines():
    one = torchrun_args(4, 1, 0, None, 29500, ["--config", "c.json"])
    assert one == ["--nproc-per-node=4", "--nnodes=1", "--max-restarts=0", "--standalone",
                   "-m", "qlora_trainer", "--config", "c.json"]
    many = torchrun_args(2, 3, 2, "job-0.job-ranks", 29400, [])
    assert "--rdzv-backend=static" in many and "--node-rank=2" in many and "--master-addr=job-0.job-ranks" in many
    with pytest.raises(ValueError):
        torchrun_args(2, 2, 1, None, 29500, [])


def test_each_rank_writes_its_own_message_under_torchrun(tmp_path):
    env = {"QLORA_RANK_MESSAGES": str(tmp_path), "RANK": "3"}
    assert rank_message_path("/dev/termination-log", env) == str(tmp_path / "rank-3.json")
    assert rank_message_path("/dev/termination-log", {}) == "/dev/termination-log"


def _write(folder, rank, text):
    (folder / f"rank-{rank}.json").write_text(text)
    time.sleep(0.01)  # distinct modification times: order is what tells the cause


def _error(reason, message, code):
    return json.dumps({"event": "error", "reason": reason, "message": message, "exitCode": int(code)})


def test_the_first_failure_explains_the_group(tmp_path):
    _write(tmp_path, 1, _error("BadData", "train.jsonl line 3: not JSON", ExitCode.BAD_DATA))
    _write(tmp_path, 0, _error("Unexpected", "RuntimeError: Connection closed by peer", ExitCode.UNEXPECTED))
    text, code = node_outcome(tmp_path, {0: 1, 1: 3})
    message = parse_termination_message(text)
    assert code == ExitCode.BAD_DATA and isinstance(message, TrainerError)
    assert message.reason == "BadData" and message.message.startswith("rank 1: train.jsonl line 3")


def test_a_rank_killed_without_a_message_is_named(tmp_path):
    _write(tmp_path, 0, _error("Unexpected", "RuntimeError: Connection closed by peer", ExitCode.UNEXPECTED))
    text, code = node_outcome(tmp_path, {0: 1, 1: -9})
    message = parse_termination_message(text)
    assert code == ExitCode.UNEXPECTED and "rank 1 died without a message (exit -9)" in message.message
    (tmp_path / "none").mkdir()
    text, code = node_outcome(tmp_path / "none", {2: -9})
    assert code == ExitCode.UNEXPECTED and parse_termination_message(text).reason == "WorkerLost"


def test_success_reports_rank_zeros_result_or_nothing_on_other_nodes(tmp_path):
    result = json.dumps({"event": "result", "result": {"adapterUri": "s3://a/b/"}})
    _write(tmp_path, 0, result)
    _write(tmp_path, 1, RANK_DONE)
    assert node_outcome(tmp_path, {}) == (result, 0)
    (tmp_path / "rank-0.json").unlink()
    assert node_outcome(tmp_path, {}) == (None, 0)
