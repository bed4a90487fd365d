"""Running the real trainer CLI as a subprocess, the way the pod runs it, and reading its reports."""

import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from qlora_api import TrainerPhaseLine, TrainerProgressLine
from qlora_api.protocol import parse_termination_message

from trainer_fixtures.s3_server import S3Server

# Tiny-model settings that learn the colour task in a few dozen CPU steps. The learning rate is
# far above a real model's 2e-4: the base is random and tiny, and the adapter does all the work.
TINY_TRAINING = {
    "maxSteps": 40,
    "learningRate": 1e-2,
    "batchSize": 2,
    "gradientAccumulationSteps": 2,
    "maxSeqLength": 64,
    "loggingSteps": 5,
    "warmupSteps": 2,
    "checkpointSteps": 20,
}


def run_config(s3: S3Server, model_uri: str, data_uri: str, run_id: str, *, eval_uri: str | None = None,
               training: dict | None = None, output: dict | None = None, lora: dict | None = None) -> dict:
    dataset = {"uri": data_uri, **({"evalUri": eval_uri} if eval_uri else {})}
    return {
        "namespace": "team-a",
        "name": "colours",
        "runId": run_id,
        "spec": {
            "model": {"uri": model_uri},
            "dataset": dataset,
            "output": {"bucket": "adapters", "endpointUrl": s3.endpoint, "addressingStyle": "path", **(output or {})},
            "lora": {"r": 8, "alpha": 16, "dropout": 0.0, **(lora or {})},
            "training": {**TINY_TRAINING, **(training or {})},
        },
    }


def trainer_env(s3: S3Server | None, **extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           **(s3.env if s3 else {}), **extra}
    return env


@dataclass
class TrainerProcess:
    """The CLI in a subprocess; stdout and stderr are collected line by line as they arrive."""

    workdir: Path
    config: dict
    env: dict
    stdout: list[str] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)
    extra_args: list[str] = field(default_factory=list)  # e.g. ["--nproc-per-node", "2"]
    # Called with each stdout line as it arrives, on the reader thread: a test that must act at an
    # exact step (signal the trainer, stop the store) reacts here instead of polling.
    on_stdout: object = None

    def __post_init__(self):
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = self.workdir / "config.json"
        self.termination_log = self.workdir / "termination-log"
        self.config_path.write_text(json.dumps(self.config) if isinstance(self.config, dict) else self.config)
        self.termination_log.unlink(missing_ok=True)
        self.started = time.monotonic()
        self.wall_seconds: float | None = None
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "qlora_trainer", *self.extra_args, "--config", str(self.config_path),
             "--termination-log", str(self.termination_log), "--workdir", str(self.workdir / "scratch")],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=self.env,
        )
        self._readers = [threading.Thread(target=self._pump, args=(s, sink, hook), daemon=True)
                         for s, sink, hook in ((self.proc.stdout, self.stdout, self.on_stdout),
                                               (self.proc.stderr, self.stderr, None))]
        for r in self._readers:
            r.start()

    @staticmethod
    def _pump(stream, sink, hook=None):
        for line in stream:
            sink.append(line.rstrip("\n"))
            if hook is not None:
                hook(sink[-1])

    def wait(self, timeout: float = 300) -> int:
        rc = self.proc.wait(timeout=timeout)
        self.wall_seconds = self.wall_seconds or time.monotonic() - self.started
        for r in self._readers:
            r.join(timeout=10)
        return rc

    def wait_for(self, condition, timeout: float = 120, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"trainer exited ({self.proc.returncode}) before {what}:\n" + self.log_tail())
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}:\n" + self.log_tail())

    @property
    def progress(self) -> list[TrainerProgressLine]:
        return [p for p in (TrainerProgressLine.parse(line) for line in list(self.stdout)) if p is not None]

    @property
    def losses(self) -> dict[int, float]:
        """step -> training loss, from the progress lines that carry one (a resumed run's first
        report names the step it resumed from and has no loss)."""
        return {p.step: p.loss for p in self.progress if p.loss is not None}

    @property
    def phases(self) -> list[TrainerPhaseLine]:
        return [p for p in (TrainerPhaseLine.parse(line) for line in list(self.stdout)) if p is not None]

    @property
    def stdout_reports(self) -> list[str]:
        """stdout without the phase lines: the progress reports (and anything that should not be there)."""
        return [line for line in list(self.stdout) if TrainerPhaseLine.parse(line) is None]

    @property
    def termination(self):
        text = self.termination_log.read_text() if self.termination_log.exists() else None
        return parse_termination_message(text)

    @property
    def termination_text(self) -> str:
        return self.termination_log.read_text()

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.stderr[-n:])


def published_manifests(s3, run_id: str) -> list[str]:
    """The keys of run `run_id`'s publication manifests in the test store (checkpoints excluded)."""
    prefix = f"adapters/team-a/colours/{run_id}/"
    return [k for k in s3.keys("adapters", prefix) if k.endswith("manifest.json") and "/checkpoints/" not in k]


def run_trainer(workdir: Path, config: dict | str, env: dict, timeout: float = 300) -> TrainerProcess:
    proc = TrainerProcess(workdir, config, env)
    proc.wait(timeout)
    return proc


def jsonl(records: list) -> bytes:
    return ("\n".join(json.dumps(r) for r in records) + "\n").encode()
