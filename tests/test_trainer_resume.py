"""Checkpoints and resumption: a pod killed mid-run (SIGKILL) or stopped (SIGTERM) is replaced by a
new one that resumes from the newest complete checkpoint in S3 instead of starting over."""

import json
import re
import signal

import pytest
from qlora_api import ExitCode, TrainerError, TrainerResultMessage
from trainer_fixtures.fixtures import colour_data, s3, tiny_model_dir, tiny_model_uri  # noqa: F401
from trainer_fixtures.runs import TrainerProcess, run_config, trainer_env

pytestmark = pytest.mark.slow

PREFIX = "adapters/team-a/colours/run-resume/checkpoints/"


def complete_checkpoints(s3) -> list[int]:  # noqa: F811
    return sorted(int(m.group(1)) for k in s3.keys("adapters", PREFIX)
                  if (m := re.match(re.escape(PREFIX) + r"step-(\d+)/manifest\.json$", k)))


def test_killed_and_stopped_runs_resume_from_the_newest_complete_checkpoint(s3, tiny_model_uri, colour_data,  # noqa: F811
                                                                            tmp_path):
    config = run_config(s3, tiny_model_uri, colour_data["train"], "run-resume", eval_uri=colour_data["eval"],
                        training={"checkpointSteps": 5, "maxSteps": 40})
    env = trainer_env(s3)

    # 1. A pod dies without warning once a checkpoint exists.
    first = TrainerProcess(tmp_path / "pod-1", config, env)
    first.wait_for(lambda: complete_checkpoints(s3), what="a complete checkpoint")
    first.proc.send_signal(signal.SIGKILL)
    first.wait()
    newest = max(complete_checkpoints(s3))
    assert newest < 40, "the run finished before it could be killed"

    # 2. Its replacement resumes (and says so); then it is asked to stop, as on preemption.
    second = TrainerProcess(tmp_path / "pod-2", config, env)
    second.wait_for(lambda: any(p.loss is not None for p in second.progress), what="a trained step's progress line")
    second.proc.send_signal(signal.SIGTERM)
    assert second.wait() == ExitCode.INTERRUPTED, second.log_tail()
    resumed_line = next(line for line in second.stderr if "resuming from checkpoint step" in line)
    resumed_at = int(re.search(r"step (\d+)", resumed_line).group(1))
    assert resumed_at >= newest  # the first pod may have finished one more upload as it died
    # The resumed pod's first report, before any step, says where it resumed (the operator shows it in status).
    resume = second.progress[0]
    assert (resume.step, resume.resumed_from_step, resume.checkpoint_step, resume.loss) == (resumed_at,) * 3 + (None,)
    assert resume.checkpoint_uri == f"s3://adapters/{PREFIX}step-{resumed_at}/"
    assert second.progress[1].step > resumed_at and second.progress[1].resumed_from_step == resumed_at  # not over
    error = second.termination
    assert isinstance(error, TrainerError) and error.reason == "Interrupted" and error.exit_code == 7
    stopped_at = int(re.search(r"at step (\d+)", error.message).group(1))
    assert stopped_at > resumed_at
    assert max(complete_checkpoints(s3)) == stopped_at  # SIGTERM saved a checkpoint before exiting
    assert len(complete_checkpoints(s3)) <= 2  # older ones are pruned

    # 3. The next pod resumes from that checkpoint and finishes the run.
    third = TrainerProcess(tmp_path / "pod-3", config, env)
    assert third.wait() == 0, third.log_tail()
    result = third.termination
    assert isinstance(result, TrainerResultMessage)
    assert result.result.resumed_from_step == stopped_at
    assert (third.progress[0].step, third.progress[0].resumed_from_step) == (stopped_at, stopped_at)
    assert third.progress[1].step > stopped_at and third.progress[-1].step == 40
    # Later reports carry the newest checkpoint uploaded since (every 5 steps); step 40's line is
    # printed before that step's own checkpoint, so it names step 35's (or the one resumed from).
    assert third.progress[-1].checkpoint_step == max(35, stopped_at)
    assert result.result.eval_loss_after < 0.6 * result.result.eval_loss_before
    metrics = json.loads(s3.get("adapters", "adapters/team-a/colours/run-resume/metrics.json"))
    assert metrics["resumed_from_step"] == stopped_at and metrics["steps"] == 40
