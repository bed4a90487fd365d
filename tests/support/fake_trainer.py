"""A scripted stand-in for the trainer image, for operator tests that must be fast and need no torch.

It speaks the real trainer's protocol (qlora_api): reads the TrainerRunConfig at --config, prints
TrainerProgressLine JSON on stdout, writes a TrainerResultMessage or TrainerError to
--termination-log and exits with an ExitCode. What it does is chosen by the model URI:

    hf://fake/succeed       train spec.training.maxSteps steps (default 10) of 0.2 s, then publish
    hf://fake/bad-data      fail at once: BadData (permanent)
    hf://fake/flaky         attempt 1 fails with StorageUnavailable (retryable), later attempts succeed
    hf://fake/oom           allocate memory until the node agent kills it (OOMKilled)
    hf://fake/gated         train until the test releases it (a file, see `scratch_dir`), then publish
    hf://fake/gated-fail    the same, then fail: BadData (permanent)
    hf://fake/s3-checkpoints  train, writing a checkpoint object to the job's S3 output every step
                            through the real trainer's S3Storage (its retries and backoff); S3
                            unreachable after those retries: StorageUnavailable. SIGTERM stops it
                            at the end of the step, as the real trainer does in its training loop.

Every run appends one line to `scratch_dir()/<namespace>.<name>.runs`, so a test can count how many
times the trainer of a QLoRAJob ran, whatever happened to its pods.

On SIGTERM it "checkpoints" (the step, under `scratch_dir()`/<runId>.json), reports
Interrupted and exits 7; the next pod of the same run resumes from that step, like the real one.

The local cluster's node agent runs it for the image `qlora-fake-trainer` (see its image table).
"""

import argparse
import hashlib
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

from qlora_api import ExitCode, TrainerError, TrainerProgressLine, TrainerResultMessage, TrainerRunConfig
from qlora_api.status import TrainingResult

STEP_SECONDS = 0.2


def write(path: str, message) -> None:
    Path(path).write_text(message.model_dump_json(by_alias=True, exclude_none=True))


def fail(args, reason: str, message: str, code: ExitCode) -> int:
    print(f"error: {reason}: {message}", file=sys.stderr, flush=True)
    write(args.termination_log, TrainerError(reason=reason, message=message, exit_code=int(code)))
    return int(code)


def scratch_dir() -> Path:
    """Where the fake trainer keeps what outlives a pod. Under a node agent: the node's own folder
    (`<node root>/fake-trainer`, from NODEAGENT_POD_DIR = `<node root>/pods/<uid>`), which a test knows
    from its cluster's state dir, whatever TMPDIR either side has; elsewhere the temp dir."""
    pod_dir = os.environ.get("NODEAGENT_POD_DIR")
    folder = Path(pod_dir).parents[1] / "fake-trainer" if pod_dir else Path(tempfile.gettempdir()) / "qlora-fake-trainer"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def checkpoint_file(run_id: str) -> Path:
    return scratch_dir() / f"{run_id}.json"


def job_file_name(namespace: str, name: str, suffix: str) -> str:
    """`<namespace>.<name>.<suffix>`, with a long name (up to 253 characters, which the hostile
    corpus uses) cut and hashed so the file name stays under the file system's 255 bytes."""
    if len(name) > 100:
        name = f"{name[:40]}-{hashlib.sha256(name.encode()).hexdigest()[:16]}"
    return f"{namespace}.{name}.{suffix}"


def record_run(cfg: TrainerRunConfig, scenario: str) -> None:
    with open(scratch_dir() / job_file_name(cfg.namespace, cfg.name, "runs"), "a") as runs:
        runs.write(json.dumps({"attempt": cfg.attempt, "pid": os.getpid(), "scenario": scenario,
                               "started": time.time()}) + "\n")


def released(cfg: TrainerRunConfig) -> bool:
    """The gate of the `gated` scenarios: a test creates this file to let the trainer finish."""
    return (scratch_dir() / job_file_name(cfg.namespace, cfg.name, "release")).exists()


def train(args, cfg: TrainerRunConfig, until=None, each_step=None, publish: bool = True) -> int:
    """maxSteps steps; or, with `until`, steps until until() is true. each_step(step) runs after each
    step (a checkpoint), and a SIGTERM during it stops the run once it returns."""
    total = cfg.spec.training.max_steps or 10
    saved = checkpoint_file(cfg.run_id)
    start = json.loads(saved.read_text())["step"] if saved.exists() else 0
    stop = {"requested": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(requested=True))
    print(f"run {cfg.run_id} attempt {cfg.attempt}: resuming at step {start} of {total}", flush=True)
    step = start
    while (not until() if until else step < total):
        if stop["requested"]:
            saved.write_text(json.dumps({"step": step}))
            print(f"SIGTERM: checkpoint saved at step {step}", flush=True)
            return fail(args, "Interrupted", f"stopped by SIGTERM at step {step} (checkpoint saved)",
                        ExitCode.INTERRUPTED)
        time.sleep(STEP_SECONDS)
        step += 1
        line = TrainerProgressLine(step=step, total_steps=max(total, step), loss=round(3.0 / step, 4),
                                   epoch=step / max(total, step))
        print(line.model_dump_json(by_alias=True, exclude_none=True), flush=True)
        if each_step:
            each_step(step)
    if not publish:
        return int(ExitCode.OK)
    out = cfg.spec.output
    uri = f"s3://{out.bucket}/{out.prefix}/{cfg.namespace}/{cfg.name}/{cfg.run_id}/"
    manifest = json.dumps({"adapterUri": uri, "files": []}).encode()  # what the real trainer writes last
    write(args.termination_log, TrainerResultMessage(result=TrainingResult(
        adapter_uri=uri, manifest_uri=uri + "manifest.json", manifest_sha256=hashlib.sha256(manifest).hexdigest(),
        train_seconds=STEP_SECONDS * (step - start), resumed_from_step=start or None)))
    print(f"published {uri}", flush=True)
    return int(ExitCode.OK)


def s3_checkpoints(args, cfg: TrainerRunConfig) -> int:
    """Checkpoints through the real trainer's store, so an S3 outage meets its real retries."""
    from qlora_trainer.errors import TrainerFailure
    from qlora_trainer.storage import S3Storage, S3Uri

    out = cfg.spec.output
    # A short outage budget (the real default is 300 s): the trainer gives up StorageUnavailable soon
    # after the store goes away instead of retrying until the grace period's SIGKILL, which keeps the
    # deletion tests short; either way the pod stops within its grace period.
    store = S3Storage(out, outage_budget_seconds=float(os.environ.get("QLORA_S3_OUTAGE_SECONDS", "15")))
    base = S3Uri(out.bucket, f"{out.prefix}/{cfg.namespace}/{cfg.name}/{cfg.run_id}/checkpoints")
    try:
        return train(args, cfg, each_step=lambda step: store.put_bytes(
            json.dumps({"step": step}).encode(), base.join(f"step-{step}.json")))
    except TrainerFailure as failure:
        return fail(args, failure.reason, failure.message, failure.exit_code)


def hog_memory() -> int:
    hoard = []
    while True:  # the node agent kills the process group once it is over its memory limit
        hoard.append(bytearray(32 * 1024 * 1024))
        time.sleep(0.05)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--termination-log", required=True)
    args = parser.parse_args(argv)
    cfg = TrainerRunConfig.model_validate_json(Path(args.config).read_text())
    scenario = cfg.spec.model.uri.removeprefix("hf://fake/")
    print(f"fake trainer pid {os.getpid()}: scenario {scenario}", flush=True)
    record_run(cfg, scenario)
    if scenario == "bad-data":
        return fail(args, "BadData", f"{cfg.spec.dataset.uri} line 3: a record without 'messages'",
                    ExitCode.BAD_DATA)
    if scenario == "flaky" and cfg.attempt == 1:
        return fail(args, "StorageUnavailable", "S3 answered 503 Slow Down three times",
                    ExitCode.STORAGE_UNAVAILABLE)
    if scenario == "oom":
        return hog_memory()
    if scenario in ("gated", "gated-fail"):
        code = train(args, cfg, until=lambda: released(cfg), publish=scenario == "gated")
        if scenario == "gated-fail" and code == ExitCode.OK:
            return fail(args, "BadData", f"{cfg.spec.dataset.uri} line 7: a record without 'messages'",
                        ExitCode.BAD_DATA)
        return code
    if scenario == "s3-checkpoints":
        return s3_checkpoints(args, cfg)
    return train(args, cfg)


if __name__ == "__main__":
    sys.exit(main())
