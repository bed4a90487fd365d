"""QLoRAJobStatus: what the operator observed, as Conditions a human and `kubectl wait` can act on."""

from datetime import datetime
from typing import Literal

from pydantic import Field

from qlora_api.base import ApiModel

Phase = Literal["Pending", "Running", "Suspended", "Succeeded", "Failed"]


class ConditionType:
    """Condition types (each True, False or Unknown, with a CamelCase reason)."""

    ACCEPTED = "Accepted"  # the spec is valid and the operator owns the job
    SCHEDULED = "Scheduled"  # the trainer pod is bound to a GPU node (False: Unschedulable, with the scheduler's words)
    RUNNING = "Running"  # the trainer is training
    SUSPENDED = "Suspended"
    SUCCEEDED = "Succeeded"  # the adapter is published; terminal
    FAILED = "Failed"  # terminal; the reason says why (OOMKilled, DeadlineExceeded, TrainerError, ...)
    # Summaries of the above in the "abnormal-true" shape that kstatus (Flux, cli-utils) reads; see
    # qlora_operator/kstatus_conditions.py. Reconciling and Stalled are present only while True.
    READY = "Ready"  # True once Succeeded
    RECONCILING = "Reconciling"  # pending, queued or running
    STALLED = "Stalled"  # Failed


class Reason:
    """CamelCase reasons the operator sets on conditions and Events. A trainer that fails with a
    TrainerError message lends its own reason (BadData, CudaOutOfMemory, ...) to Failed."""

    ACCEPTED = "Accepted"
    INVALID_SPEC = "InvalidSpec"  # the API server took a spec the operator's models refuse (version skew)
    JOB_CREATED = "JobCreated"  # Event only: a trainer Job for a new attempt
    PENDING = "Pending"  # waiting for the Job controller, the scheduler or the container to start
    QUEUED = "Queued"  # Kueue holds the trainer Job until its Workload is admitted; the message is Kueue's
    SCHEDULED = "Scheduled"
    UNSCHEDULABLE = "Unschedulable"  # the message is the scheduler's own
    IMAGE_PULL_FAILED = "ImagePullFailed"  # ErrImagePull / ImagePullBackOff / InvalidImageName
    CONTAINER_CONFIG_ERROR = "ContainerConfigError"  # the pod's container cannot be configured (not a Secret)
    SECRET_NOT_FOUND = "SecretNotFound"  # the S3 credentials Secret, or a key in it, is missing: the pod waits
    TRAINING = "Training"
    EVICTED = "Evicted"  # the Job replaces the pod; the trainer resumes from its checkpoint
    PREEMPTED = "Preempted"
    RETRYING = "Retrying"  # a retryable failure; the next attempt is planned
    SUSPENDED = "Suspended"
    RESUMED = "Resumed"
    COMPLETED = "Completed"  # Running=False once the trainer exited
    SUCCEEDED = "Succeeded"
    OOM_KILLED = "OOMKilled"  # over spec.resources.memory
    DEADLINE_EXCEEDED = "DeadlineExceeded"  # spec.activeDeadlineSeconds, all attempts together
    POD_LOST = "PodLost"  # the pod or the Job vanished without an exit code (node lost, deleted)
    TRAINER_CRASHED = "TrainerCrashed"  # an exit code outside qlora_api.ExitCode (a signal, a segfault)
    RESULT_MISSING = "ResultMissing"  # exit 0 without a readable result message
    RESULT_UNVERIFIED = "ResultUnverified"  # a result without the manifest's URI and sha256: retried
    JOB_REJECTED = "JobRejected"  # the API server refused the trainer Job the spec makes (e.g. its affinity)


class Condition(ApiModel):
    type: str = Field(max_length=316)
    status: Literal["True", "False", "Unknown"]
    reason: str = Field(max_length=1024, pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")
    message: str = Field("", max_length=32768)
    last_transition_time: datetime
    observed_generation: int | None = Field(None, ge=0)


class TrainingProgress(ApiModel):
    """The trainer's latest progress report."""

    step: int = Field(0, ge=0)
    total_steps: int | None = Field(None, ge=0)
    epoch: float | None = None
    loss: float | None = None
    learning_rate: float | None = None
    eval_loss: float | None = None
    tokens_per_second: float | None = Field(None, description="Tokens per second of the whole group (all GPUs).")
    tokens_per_second_per_gpu: float | None = Field(None, description="tokensPerSecond divided by worldSize.")
    world_size: int | None = Field(None, ge=1, description="Training processes (GPUs) in the group.")
    mfu: float | None = Field(None, description="Model FLOPs utilisation per GPU, 0-1, where the GPU's peak is known.")
    gpu_memory_gib: float | None = Field(None, description="Peak GPU memory allocated so far.")
    eta_seconds: float | None = None
    summary: str | None = Field(None, max_length=64, description="step/total (percent), for kubectl get.")
    # How much a preemption would cost: a replacement pod resumes at checkpointStep, so at most
    # step - checkpointStep steps are trained twice. Reported by the trainer, never guessed here.
    checkpoint_step: int | None = Field(
        None, ge=0, description="The step of the newest complete checkpoint in S3 known to the trainer (the one it "
        "resumed from, or the last one it uploaded, as of this report): a replacement pod resumes there.")
    checkpoint_uri: str | None = Field(None, max_length=2048, description="s3:// folder of that checkpoint.")
    resumed_from_step: int | None = Field(
        None, ge=0, description="The checkpoint step this trainer pod resumed from (unset: it started at step 0). "
        "A resumed pod reports it at once, before its first training step.")
    updated_at: datetime | None = None


class PublishedFile(ApiModel):
    path: str
    size: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class TrainingResult(ApiModel):
    """What the trainer published."""

    adapter_uri: str = Field(description="s3:// folder with the adapter, tokenizer, config, metrics and manifest.")
    manifest_uri: str | None = None
    manifest_sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    files: list[PublishedFile] = Field(default_factory=list)
    total_bytes: int | None = Field(None, ge=0)
    base_model: str | None = Field(
        None, max_length=2048,
        description="The base model as a server names it: the Hugging Face id of an hf:// model, else its URI "
        "(also adapter_config.json's base_model_name_or_path).",
    )
    base_model_revision: str | None = Field(
        None, description="What exactly was loaded: the commit of an hf:// model, a content fingerprint otherwise."
    )
    lora_rank: int | None = Field(None, ge=1, description="The adapter's rank (a server's max LoRA rank must be at least this).")
    lora_alpha: int | None = Field(None, ge=1)
    target_modules: list[str] = Field(
        default_factory=list, max_length=256,
        description="The module names the adapter wraps, as resolved in the model (all-linear expanded).",
    )
    merged_model_uri: str | None = Field(None, description="s3:// folder of the merged bf16 model (mergedExport).")
    merged_model_manifest_uri: str | None = None
    merged_model_manifest_sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    eval_loss_before: float | None = None
    eval_loss_after: float | None = None
    perplexity_before: float | None = None
    perplexity_after: float | None = None
    train_seconds: float | None = None
    resumed_from_step: int | None = Field(None, description="The checkpoint step the publishing pod resumed from.")


class WorkerStatus(ApiModel):
    """One trainer pod of a data-parallel group (ranks index x gpu.count .. + gpu.count - 1)."""

    index: int = Field(ge=0, description="The pod's completion index: its node rank.")
    pod: str
    node: str | None = None
    state: Literal["Pending", "Running", "Succeeded", "Failed"]


class QLoRAJobStatus(ApiModel):
    phase: Phase | None = None
    conditions: list[Condition] = Field(
        default_factory=list,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    observed_generation: int | None = None
    start_time: datetime | None = None
    completion_time: datetime | None = None
    attempts: int | None = Field(None, ge=0, description="Trainer Jobs created so far (one per attempt).")
    job_name: str | None = Field(None, description="The current attempt's batch/v1 Job.")
    message: str | None = Field(None, max_length=32768, description="The latest human-readable status line.")
    progress: TrainingProgress | None = None
    result: TrainingResult | None = None
    world_size: int | None = Field(None, ge=1, description="Data-parallel ranks: workers x gpu.count.")
    workers: list[WorkerStatus] = Field(
        default_factory=list, max_length=64,
        description="The current attempt's trainer pods and their state (one per worker).",
    )
