"""Promise 5, a checkpoint within the grace period: the real trainer CLI on the tiny model is sent
SIGTERM at seeded steps (QLORA_GRACE_SEED picks another sequence); each time a complete checkpoint
(every file, then the manifest that lists them with their sha256) is in S3 before the pod's
terminationGracePeriodSeconds (TERMINATION_GRACE_SECONDS, which the operator renders) has run from
the signal, and the run resumed from it logs, step for step, the losses of a run never stopped.

One chain of pods, as the operator would start them for one QLoRAJob:
  pod 1: SIGTERM in the first steps, before any periodic checkpoint;
  pod 2: SIGTERM while a periodic checkpoint is being uploaded (the relay sends it as the first file
         of that checkpoint reaches the store), so the signal lands inside the upload;
  pod 3: SIGTERM at a random later step;
  pod 4: finds a newer checkpoint folder that an upload cut by SIGKILL left without its manifest,
         ignores it, resumes from pod 3's checkpoint and finishes.
The losses are compared with an uninterrupted run of the same spec: dropout is on (0.1) and the data
is shuffled, so they match only if the checkpoint restored the adapter, the optimizer, the schedule,
the data position and the RNG states.

Tolerance: 1e-5 absolute. Both runs compute each step with the same CPU kernels in the same order
on the same thread count, and everything the step depends on is restored bit for bit (fp32 LoRA
weights in safetensors, the optimizer's fp32 moments and the RNG states through torch.save), so
the losses are expected to be identical (measured: identical, seeds 5 and 7); 1e-5 is a margin for float32 summation on a loss of order
1, a hundred times smaller than the changes of one step (at a learning rate of 1e-2 consecutive
losses differ by more than 1e-3) and far below what a lost step, a repeated batch or a
fresh dropout seed would cause (each shifts the loss by more than 1e-2 here).
"""

import hashlib
import json
import os
import random
import re
import signal
import time

import pytest
from qlora_api import ExitCode, TrainerError, TrainerProgressLine, TrainerResultMessage
from qlora_api.protocol import TERMINATION_GRACE_SECONDS
from trainer_fixtures.fixtures import tiny_model_dir  # noqa: F401
from trainer_fixtures.relayed_minio import relayed_minio
from trainer_fixtures.runs import TrainerProcess, run_config, trainer_env

pytestmark = pytest.mark.slow

SEED = int(os.environ.get("QLORA_GRACE_SEED", "5"))
STEPS, EVERY = 14, 5  # periodic checkpoints at steps 5 and 10 (and the last, 14)
TOLERANCE = 1e-5
RUN = "run-grace"
CHECKPOINTS = f"adapters/team-a/colours/{RUN}/checkpoints/"
# What makes a resume exact: the Trainer's own checkpoint, LoRA weights and all the state around them.
RESUME_STATE = {"adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"}


def cut_points(seed: int) -> tuple[int, int, int]:
    """(a step in the first ones, a periodic checkpoint to interrupt mid-upload, a later step)."""
    rng = random.Random(seed)
    first = rng.randint(1, 2)
    upload = rng.choice([s for s in range(EVERY, STEPS, EVERY)])
    later = rng.randint(upload + 1, STEPS - 2)
    return first, upload, later


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_model_dir):  # noqa: F811
    with relayed_minio(tmp_path_factory.mktemp("grace-minio"), tiny_model_dir) as store:
        yield store


def config(store, run_id: str) -> dict:
    return run_config(store.trainer_server, store.model_uri, store.train_uri, run_id, eval_uri=store.eval_uri,
                      training={"maxSteps": STEPS, "checkpointSteps": EVERY, "loggingSteps": 1},
                      lora={"dropout": 0.1})


def complete_checkpoint(store, step: int) -> set[str]:
    """The files of checkpoint `step`, each checked against the manifest (which must exist)."""
    folder = f"{CHECKPOINTS}step-{step}/"
    manifest = json.loads(store.server.get("adapters", folder + "manifest.json"))
    assert manifest["step"] == step
    for entry in manifest["files"]:
        body = store.server.get("adapters", folder + entry["path"])
        assert (len(body), hashlib.sha256(body).hexdigest()) == (entry["size"], entry["sha256"]), entry["path"]
    names = {e["path"] for e in manifest["files"]}
    assert RESUME_STATE <= names, names
    return names


def newest_complete(store) -> int:
    return max(int(m.group(1)) for k in store.server.keys("adapters", CHECKPOINTS)
               if (m := re.search(r"step-(\d+)/manifest\.json$", k)))


class Stopper:
    """Sends SIGTERM to a trainer (from the stdout reader or the relay's thread) and remembers when."""

    def __init__(self):
        self.proc: TrainerProcess | None = None
        self.sent_at: float | None = None

    def __call__(self) -> None:
        if self.sent_at is None:
            self.sent_at = time.monotonic()
            self.proc.proc.send_signal(signal.SIGTERM)

    def at_step(self, step: int):
        def on_line(line: str) -> None:
            progress = TrainerProgressLine.parse(line)
            if progress is not None and progress.step == step:
                self()
        return on_line

    def stopped(self) -> int:
        """Wait for the trainer to exit on the signal; the step it says it stopped at."""
        rc = self.proc.wait(timeout=300)
        seconds = time.monotonic() - self.sent_at
        assert rc == ExitCode.INTERRUPTED, self.proc.log_tail()
        error = self.proc.termination
        assert isinstance(error, TrainerError) and error.reason == "Interrupted", error
        # The checkpoint's manifest is written before the trainer exits: it was in S3 this soon.
        assert seconds < TERMINATION_GRACE_SECONDS, f"{seconds:.1f} s from SIGTERM to exit"
        print(f"SIGTERM -> complete checkpoint and exit: {seconds:.1f} s (grace period {TERMINATION_GRACE_SECONDS} s)")
        return int(re.search(r"at step (\d+)", error.message).group(1))


def pod(store, tmp_path, name: str, stopper: Stopper | None = None, on_stdout=None) -> TrainerProcess:
    proc = TrainerProcess(tmp_path / name, config(store, RUN), trainer_env(store.trainer_server),
                          on_stdout=on_stdout)
    if stopper is not None:
        stopper.proc = proc
    return proc


def resumed_from(proc: TrainerProcess) -> int | None:
    line = next((line for line in proc.stderr if "resuming from checkpoint step" in line), None)
    return int(re.search(r"step (\d+)", line).group(1)) if line else None


def assert_continues(proc: TrainerProcess, start: int, reference: dict[int, float]) -> None:
    """The pod resumed at `start` and logged the uninterrupted run's loss at every step after it."""
    got = proc.losses
    assert resumed_from(proc) == start, proc.log_tail()
    assert got and min(got) == start + 1, sorted(got)
    for step, loss in got.items():
        assert loss == pytest.approx(reference[step], abs=TOLERANCE), (step, loss, reference[step])
    print(f"resumed at {start}: steps {min(got)}-{max(got)}, largest loss difference from the uninterrupted run "
          f"{max(abs(loss - reference[step]) for step, loss in got.items()):.2e}")


def test_sigterm_leaves_a_complete_checkpoint_within_the_grace_period_and_the_loss_continues(store, tmp_path):
    first, upload, later = cut_points(SEED)
    print(f"seed {SEED}: SIGTERM after step {first}, during the upload of checkpoint {upload}, after step {later}")

    reference_run = TrainerProcess(tmp_path / "reference", config(store, "run-grace-reference"),
                                   trainer_env(store.trainer_server))
    assert reference_run.wait(timeout=300) == 0, reference_run.log_tail()
    reference = reference_run.losses
    assert sorted(reference) == list(range(1, STEPS + 1))

    # Pod 1: SIGTERM in the first steps. The trainer finishes the step under way and saves it.
    stop1 = Stopper()
    pod1 = pod(store, tmp_path, "pod-1", stop1, on_stdout=stop1.at_step(first))
    stopped1 = stop1.stopped()
    assert first < stopped1 < EVERY, "the signal was meant for the first steps, before any periodic checkpoint"
    assert newest_complete(store) == stopped1
    complete_checkpoint(store, stopped1)
    assert resumed_from(pod1) is None

    # Pod 2: SIGTERM as the first file of periodic checkpoint `upload` reaches the store.
    stop2 = Stopper()
    store.relay.when("PUT", rf"/adapters/{CHECKPOINTS}step-{upload}/", stop2)
    pod2 = pod(store, tmp_path, "pod-2", stop2)
    stopped2 = stop2.stopped()
    # It lands inside the upload: the upload completes, and the trainer stops at once with the
    # checkpoint it just made (no further step, no second upload inside the grace period).
    log = "\n".join(pod2.stderr)
    assert log.index("SIGTERM received") < log.index(f"checkpoint step {upload} saved")
    assert stopped2 == upload and newest_complete(store) == upload
    complete_checkpoint(store, upload)
    assert_continues(pod2, stopped1, reference)

    # Pod 3: SIGTERM at a random later step.
    stop3 = Stopper()
    pod3 = pod(store, tmp_path, "pod-3", stop3, on_stdout=stop3.at_step(later))
    stopped3 = stop3.stopped()
    assert later < stopped3 <= STEPS and newest_complete(store) == stopped3
    complete_checkpoint(store, stopped3)
    assert_continues(pod3, upload, reference)

    # An upload cut by SIGKILL (the grace period ran out) leaves files of a newer step and no manifest:
    # the state a half-uploaded checkpoint is in. It must never be taken as the newest.
    cut = stopped3 + 1
    folder = f"{CHECKPOINTS}step-{stopped3}/"
    for name in ("adapter_model.safetensors", "optimizer.pt"):
        store.server.put("adapters", f"{CHECKPOINTS}step-{cut}/{name}", store.server.get("adapters", folder + name))

    # Pod 4 resumes from pod 3's checkpoint and finishes the run with the reference's losses.
    pod4 = pod(store, tmp_path, "pod-4")
    assert pod4.wait(timeout=300) == 0, pod4.log_tail()
    result = pod4.termination
    assert isinstance(result, TrainerResultMessage) and result.result.resumed_from_step == stopped3
    if stopped3 < STEPS:
        assert_continues(pod4, stopped3, reference)
        assert max(pod4.losses) == STEPS


def test_sigterm_while_publishing_lets_the_publication_finish(store, tmp_path):
    """A SIGTERM between the publication claim and the manifest: the trainer finishes publishing
    (seconds, inside the grace period) and exits 0 with its result. Stopping there instead would
    leave a claim of this very attempt, which the replacement pod would have to wait out as a live
    racer's (publishing.WINNER_WAIT_SECONDS) before failing the attempt."""
    run = "run-grace-publish"
    stopper = Stopper()
    fired = store.relay.when("PUT", rf"/adapters/team-a/colours/{run}/publish-claim\.json", stopper)
    stopper.proc = TrainerProcess(tmp_path / "publisher", run_config(
        store.trainer_server, store.model_uri, store.train_uri, run, eval_uri=store.eval_uri,
        training={"maxSteps": 2, "checkpointSteps": 0, "loggingSteps": 1}), trainer_env(store.trainer_server))
    rc = stopper.proc.wait(timeout=300)
    assert fired.is_set(), "the trainer never claimed the publication"
    assert rc == 0, stopper.proc.log_tail()
    assert time.monotonic() - stopper.sent_at < TERMINATION_GRACE_SECONDS
    assert any("SIGTERM received while publishing" in line for line in stopper.proc.stderr), stopper.proc.log_tail()
    result = stopper.proc.termination
    assert isinstance(result, TrainerResultMessage), stopper.proc.log_tail()
    bucket, _, prefix = result.result.adapter_uri.removeprefix("s3://").partition("/")
    manifest = store.server.get(bucket, prefix.rstrip("/") + "/manifest.json")
    assert hashlib.sha256(manifest).hexdigest() == result.result.manifest_sha256
