"""The contract between the operator and the trainer pod, which holds no Kubernetes credentials.

operator -> trainer: a TrainerRunConfig as JSON in a ConfigMap mounted at CONFIG_PATH.
trainer -> operator: one JSON object per stdout line for progress (read through pods/log), and
a TrainerResultMessage or TrainerError in the container's termination message; the exit code
says whether a retry can help.
"""

import json
from enum import IntEnum
from typing import Literal

from pydantic import Field

from qlora_api.base import ApiModel
from qlora_api.spec import QLoRAJobSpec
from qlora_api.status import TrainingProgress, TrainingResult

CONFIG_MOUNT_DIR = "/etc/qlora"
CONFIG_FILE = "config.json"
CONFIG_PATH = f"{CONFIG_MOUNT_DIR}/{CONFIG_FILE}"
TERMINATION_MESSAGE_PATH = "/dev/termination-log"
# The kubelet keeps at most 4096 bytes of a termination message.
TERMINATION_MESSAGE_LIMIT = 4096
# The trainer pod's terminationGracePeriodSeconds: after SIGTERM the trainer finishes its step and
# uploads a checkpoint (LoRA weights, optimizer state, scheduler and RNG states; never the base
# weights) before the kubelet's SIGKILL. Here, not in the operator, because the trainer measures each
# checkpoint's cost against it and warns when a stop could not be saved in time.
TERMINATION_GRACE_SECONDS = 120


class ExitCode(IntEnum):
    OK = 0
    UNEXPECTED = 1  # a bug or an unclassified error: retried
    INVALID_CONFIG = 2  # permanent
    BAD_DATA = 3  # permanent: the message names the file and line
    MODEL_NOT_FOUND = 4  # permanent
    STORAGE_UNAVAILABLE = 5  # S3 unreachable, 5xx or throttling (after backoff): retried
    OUT_OF_MEMORY = 6  # CUDA OOM: permanent until the spec changes; the message has a hint
    INTERRUPTED = 7  # SIGTERM (preemption, suspend): retried, resumes from the last checkpoint
    STORAGE_REFUSED = 8  # S3 denied access, or a bucket or object is missing: permanent

    @property
    def retryable(self) -> bool:
        return self in (ExitCode.UNEXPECTED, ExitCode.STORAGE_UNAVAILABLE, ExitCode.INTERRUPTED)


class TrainerRunConfig(ApiModel):
    """Everything the trainer needs, with the job's identity for its output paths."""

    namespace: str
    name: str
    run_id: str = Field(description="Stable across attempts (the QLoRAJob's uid), so a new pod resumes the run.")
    attempt: int = Field(1, ge=1)
    spec: QLoRAJobSpec


class TrainerProgressLine(TrainingProgress):
    """A progress report as printed on stdout: {"event": "progress", ...TrainingProgress}."""

    event: Literal["progress"] = "progress"

    @staticmethod
    def parse(line: str) -> "TrainerProgressLine | None":
        """The report in one log line, or None for human-readable lines and other events."""
        line = line.strip()
        if not (line.startswith("{") and '"progress"' in line):
            return None
        try:
            data = json.loads(line)
        except ValueError:
            return None
        if not isinstance(data, dict) or data.get("event") != "progress":
            return None
        # Fields a newer trainer image adds (a user may pin one) are dropped, not fatal: the
        # models forbid unknown keys, and one new field must not cost an older operator every report.
        known = {key for name, f in TrainerProgressLine.model_fields.items() for key in (name, f.alias)}
        try:
            return TrainerProgressLine.model_validate({k: v for k, v in data.items() if k in known})
        except ValueError:
            return None


class TrainerPhaseLine(ApiModel):
    """A phase of the run that just ended, as printed on stdout: {"event": "phase", ...}.

    The time outside training, one line per phase (download, quantize, tokenize, evaluation,
    checkpoint upload, publish); the same numbers are in the published training_config.json under
    `phases`. Readers of progress lines skip these (TrainerProgressLine.parse returns None).
    """

    event: Literal["phase"] = "phase"
    phase: str = Field(pattern=r"^[a-z][A-Za-z0-9]*$", description="camelCase, e.g. downloadModel, evalBefore.")
    seconds: float = Field(ge=0)
    inside: str | None = Field(None, description="The enclosing phase (checkpointUpload runs inside train).")
    bytes: int | None = Field(None, ge=0)
    megabytes_per_second: float | None = None
    params: int | None = Field(None, ge=0)
    params_per_second: float | None = None
    tokens: int | None = Field(None, ge=0)
    tokens_per_second: float | None = None
    rows: int | None = Field(None, ge=0)

    @staticmethod
    def parse(line: str) -> "TrainerPhaseLine | None":
        line = line.strip()
        if not (line.startswith("{") and '"phase"' in line):
            return None
        try:
            data = json.loads(line)
            if not isinstance(data, dict) or data.get("event") != "phase":
                return None
            return TrainerPhaseLine.model_validate(data)
        except ValueError:
            return None


class TrainerResultMessage(ApiModel):
    """The termination message of a trainer that published its adapter."""

    event: Literal["result"] = "result"
    result: TrainingResult


class TrainerError(ApiModel):
    """The termination message of a trainer that failed: one reason, one line for humans."""

    event: Literal["error"] = "error"
    reason: str = Field(pattern=r"^[A-Z][A-Za-z0-9]*$", description="CamelCase, e.g. BadData, CudaOutOfMemory.")
    message: str
    exit_code: int


def parse_termination_message(text: str | None) -> TrainerResultMessage | TrainerError | None:
    """The trainer's termination message, or None if the container wrote none (or something else)."""
    if not text:
        return None
    try:
        data = json.loads(text)
    except ValueError:
        return None
    kind = data.get("event") if isinstance(data, dict) else None
    try:
        if kind == "result":
            return TrainerResultMessage.model_validate(data)
        if kind == "error":
            return TrainerError.model_validate(data)
    except ValueError:
        return None
    return None
