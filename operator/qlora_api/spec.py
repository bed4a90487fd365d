"""QLoRAJobSpec: what to fine-tune, on what data, how, where it runs and where the adapter goes.

Defaults follow the QLoRA paper (NF4, double quantization, bf16 compute, paged AdamW,
max grad norm 0.3) except where noted beside the field.
"""

import re
from typing import Annotated, Any, Literal

from pydantic import Field

from qlora_api.base import ApiModel
from qlora_api.rules import CrossFieldRule, RuledModel, immutable

# Patterns that mean the same to the API server (Go's RE2) and to pydantic (Rust's regex): no \s,
# whose Unicode reach differs between the two; control characters and spaces are spelled out.
# A path may hold any printable character (S3 keys are UTF-8) but no control character; "." and
# ".." segments are refused by a rule of their own (NO_DOT_SEGMENTS), with a message a human reads.
PRINTABLE = r"[^\x00-\x1f\x7f]"
NO_SPACE = r"[^\x00-\x20\x7f]"
S3_URI = rf"^s3://[a-z0-9][a-z0-9.-]{{1,61}}[a-z0-9](/{PRINTABLE}*)?$"
PVC_URI = rf"^pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?(/{PRINTABLE}*)?$"
HF_URI = r"^hf://[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$"
HTTPS_URI = rf"^https://{NO_SPACE}+$"
# A "." or ".." path segment: harmless to S3, but a pvc:// path or a local download would leave
# its folder (pvc://claim/../../etc), and a prefix would not say where the adapter lands.
DOT_SEGMENT = r"(^|/)[.][.]?(/|$)"


def _any_of(*patterns: str) -> str:
    return "^(" + "|".join(p.removeprefix("^").removesuffix("$") for p in patterns) + ")$"


def no_dot_segments(field: str, wire: str, optional: bool = False) -> CrossFieldRule:
    """Refuse "." and ".." path segments in `field` (snake_case) / `wire` (camelCase)."""
    cel = f"!self.{wire}.matches('{DOT_SEGMENT}')"
    return CrossFieldRule(
        cel=f"!has(self.{wire}) || {cel}" if optional else cel,
        message=f"{wire} must not contain '.' or '..' path segments",
        check=lambda m: getattr(m, field) is None or not re.search(DOT_SEGMENT, getattr(m, field)),
        field_path=f".{wire}",
    )


MODEL_URI = _any_of(HF_URI, S3_URI, PVC_URI)
DATA_URI = _any_of(S3_URI, HTTPS_URI, PVC_URI)
QUANTITY = r"^[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti|P|Pi|E|Ei)?$"
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
S3_BUCKET = r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$"
LABEL_VALUE = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"  # what a nodeSelector value may be
# A label key (toleration keys are label keys): an optional DNS-subdomain prefix and a name.
LABEL_KEY = r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$"
SECRET_KEY = r"^[-._a-zA-Z0-9]+$"  # a key inside a Secret
MODULE_NAME = r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$"  # a PyTorch module name (dots and ModuleList indices), or all-linear

Uri = Annotated[str, Field(max_length=2048)]
# The evaluations' bound (spec.training.evalMaxTokens). With a frozen 4-bit base a training token
# costs about 4N FLOPs (forward 2N, input gradients 2N) and an eval token 2N, so 32Ki eval tokens
# cost about what one optimizer step of 16k tokens does: before + after, ~2% of a 100-step job.
DEFAULT_EVAL_MAX_TOKENS = 32768
Name = Annotated[str, Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN)]


class ModelSource(RuledModel):
    """The base model to quantize and adapt."""

    uri: Uri = Field(
        pattern=MODEL_URI,
        description="hf://<org>/<name> (a Hugging Face model id), s3://bucket/path/ (a folder with "
        "config.json, tokenizer and safetensors) or pvc://<claim>/<path> (a folder on a PersistentVolumeClaim).",
    )
    revision: str | None = Field(
        None, max_length=255, pattern=r"^[A-Za-z0-9._/-]+$",
        description="Branch, tag or commit of an hf:// model (default: main).",
    )
    trust_remote_code: bool = Field(False, description="Allow the model repository's own Python code to run.")

    cross_field_rules = (
        CrossFieldRule(
            cel="!has(self.revision) || self.uri.startsWith('hf://')",
            message="revision applies only to hf:// models",
            check=lambda m: m.revision is None or m.uri.startswith("hf://"),
            field_path=".revision",
        ),
        no_dot_segments("uri", "uri"),
    )


class DatasetSource(RuledModel):
    """Training data: JSONL or Parquet records of one of three shapes."""

    uri: Uri = Field(pattern=DATA_URI, description="s3://, https:// or pvc://<claim>/<path> of the training file.")
    format: Literal["auto", "jsonl", "parquet"] = Field(
        "auto", description="File format; auto decides by the file extension (.jsonl/.json/.parquet)."
    )
    record_format: Literal["auto", "messages", "promptCompletion", "text"] = Field(
        "auto",
        description="messages: chat records rendered with the tokenizer's chat template; promptCompletion: "
        "loss on the completion only; text: loss on everything; auto: decided by each file's first record.",
    )
    eval_uri: Uri | None = Field(None, pattern=DATA_URI, description="A separate eval split.")
    eval_fraction: float = Field(
        0.1, ge=0.0, le=0.5, description="Without evalUri: fraction carved off the training data with the seed."
    )

    cross_field_rules = (no_dot_segments("uri", "uri"), no_dot_segments("eval_uri", "evalUri", optional=True))


class QuantizationSpec(ApiModel):
    """How the frozen base model is quantized (bitsandbytes)."""

    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type; NF4 as in the QLoRA paper.")
    double_quant: bool = Field(True, description="Quantize the quantization constants too (saves ~0.4 bit/param).")
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Matmul dtype; auto is bfloat16 where the GPU supports it, else float16."
    )


class LoRASpec(RuledModel):
    """The low-rank adapter trained on top of the frozen 4-bit base."""

    r: int = Field(16, ge=1, le=1024, description="Adapter rank.")
    alpha: int = Field(32, ge=1, le=4096, description="Scaling numerator; usually 2*r.")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the adapter input.")
    target_modules: list[Annotated[str, Field(min_length=1, max_length=128, pattern=MODULE_NAME)]] = Field(
        default_factory=lambda: ["all-linear"],
        json_schema_extra={"default": ["all-linear"]},  # the API server defaults it too (the CEL rule reads it)
        min_length=1,
        max_length=64,
        description="Module names to adapt, or the single value all-linear (every linear layer but the output head).",
    )
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases train.")

    cross_field_rules = (
        CrossFieldRule(
            cel="!has(self.targetModules) || !('all-linear' in self.targetModules) || size(self.targetModules) == 1",
            message="all-linear cannot be combined with other target modules",
            check=lambda m: "all-linear" not in m.target_modules or len(m.target_modules) == 1,
            field_path=".targetModules",
        ),
    )


class AccelerationSpec(RuledModel):
    """How the trainer computes on a GPU. Each setting trains the same model with the same optimizer
    update; they differ in speed and memory. On a CPU, and for models whose config the trainer's
    memory planner cannot read, the plain recipe runs whatever this says."""

    # "plain", not "off": YAML 1.1 (kubectl, PyYAML) reads an unquoted off as the boolean false.
    path: Literal["fused", "perProjection", "plain"] = Field(
        "fused",
        description="fused: the trainer's fast path with fused decoder layers where the architecture allows "
        "(Llama-style layers: Llama, Qwen2, Mistral and the like, at LoRA ranks up to 64) and per-projection LoRA "
        "functions elsewhere; "
        "perProjection: the fast path without fused decoder layers; plain: the plain transformers + peft recipe "
        "(no memory plan: batchSize, gradientAccumulationSteps and gradientCheckpointing run as given).",
    )
    cuda_graphs: bool | None = Field(
        None,
        description="Replay the fused decoder layers as CUDA graphs for fixed-length rows (default: on with "
        "path fused). Applies to path fused only.",
    )
    memory: Literal["auto", "lean", "max"] = Field(
        "auto",
        description="How much of the GPU the fast path's memory plan may use (micro-batch, recompute, bf16 copies "
        "of the frozen weights; the effective batch never changes). auto: the fastest plan that needs no more "
        "memory than the plain recipe would for the same job (lean when the GPU has less than 1.5x that); lean: "
        "every layer recomputed, for a small or shared GPU or long sequences; max: the whole GPU less a margin, "
        "for speed (Llama-3-8B on an H200: 1.07x auto's tokens/s with twice its memory). Applies to paths fused "
        "and perProjection on one GPU or data parallel (a sharded job plans its shards itself).",
    )

    cross_field_rules = (
        CrossFieldRule(
            cel="!has(self.cudaGraphs) || !self.cudaGraphs || !has(self.path) || self.path == 'fused'",
            message="cudaGraphs applies to path fused only",
            check=lambda m: not m.cuda_graphs or m.path == "fused",
            field_path=".cudaGraphs",
        ),
        CrossFieldRule(
            cel="!has(self.memory) || self.memory == 'auto' || !has(self.path) || self.path != 'plain'",
            message="memory applies to paths fused and perProjection only (path plain makes no memory plan)",
            check=lambda m: m.memory == "auto" or m.path != "plain",
            field_path=".memory",
        ),
    )


class TrainingSpec(RuledModel):
    """The optimisation schedule (supervised fine-tuning)."""

    epochs: float = Field(1.0, gt=0, le=1000, description="Passes over the training data (maxSteps wins if set).")
    max_steps: int | None = Field(None, ge=1, le=10_000_000, description="Stop after this many optimizer steps.")
    learning_rate: float = Field(2e-4, gt=0, le=1, description="Peak learning rate.")
    scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    warmup_ratio: float | None = Field(
        None, ge=0, le=0.5, description="Warm-up as a fraction of all steps (default 0.03 when neither is set)."
    )
    warmup_steps: int | None = Field(None, ge=0, le=1_000_000, description="Warm-up in steps.")
    batch_size: int = Field(4, ge=1, le=1024, description="Sequences per micro-batch on each GPU (see gradientAccumulationSteps).")
    gradient_accumulation_steps: int = Field(
        4, ge=1, le=1024,
        description=(
            "Micro-batches per optimizer step. batchSize x gradientAccumulationSteps is the effective batch on "
            "any number of GPUs: N data-parallel ranks each accumulate 1/N of it (or, when N does not divide "
            "this, each runs batchSize/N; when neither divides, every rank runs both as given and the "
            "effective batch is N times larger)."
        ),
    )
    max_seq_length: int = Field(
        2048, ge=16, le=262_144,
        description="Tokens per sequence (records are packed up to it; a longer record fails the job as BadData).",
    )
    packing: bool = Field(True, description="Pack records into full sequences without attention across them.")
    gradient_checkpointing: bool = Field(True, description="Recompute activations in the backward pass.")
    optimizer: Literal["paged_adamw_32bit", "paged_adamw_8bit", "adamw_torch", "adamw_8bit"] = "paged_adamw_32bit"
    weight_decay: float = Field(0.0, ge=0, le=1)
    max_grad_norm: float = Field(0.3, ge=0, le=1000, description="Gradient clipping; 0.3 as in the QLoRA paper.")
    seed: int = Field(42, ge=0, le=2**31 - 1)
    completion_only_loss: bool = Field(
        True, description="For promptCompletion and messages records: loss on the completion/assistant turns only."
    )
    logging_steps: int = Field(10, ge=1, le=100_000, description="Report progress every this many steps.")
    eval_steps: int | None = Field(None, ge=1, le=10_000_000, description="Evaluate during training (default: at the end).")
    eval_max_tokens: int = Field(
        DEFAULT_EVAL_MAX_TOKENS, ge=0, le=2**31 - 1,
        description="Tokens of the eval split scored by each evaluation (before, during and after training): "
        "a fixed-seed sample of rows, the same each time; 0 scores the whole split. The default, 32768 tokens "
        "(16 rows of 2048), costs about what one optimizer step of 16k tokens does, so the evaluations before "
        "and after together take about 2% of a 100-step job.",
    )
    checkpoint_steps: int = Field(
        100, ge=0, le=10_000_000, description="Save a resumable checkpoint to S3 every this many steps (0: never)."
    )
    parallelism: Literal["auto", "dataParallel", "sharded"] = Field(
        "auto",
        description="How a job with several GPUs (spec.resources.gpu.count x workers) uses them. dataParallel: "
        "every GPU holds the whole 4-bit model and trains its share of each batch; sharded: the 4-bit base, "
        "the adapter and its optimizer state are split across the GPUs (FSDP2), for models whose plan does "
        "not fit one GPU (it runs the plain recipe: no fused layers or CUDA graphs); auto: data parallel when "
        "the one-GPU memory plan fits, sharded when only sharding fits. A job that fits neither way fails "
        "before its weights are downloaded, naming the smallest GPU count that would fit.",
    )
    acceleration: AccelerationSpec = Field(
        default_factory=AccelerationSpec,
        json_schema_extra={"default": {}},
        description="The trainer's GPU fast path: on by default; path plain turns it off.",
    )

    cross_field_rules = (
        CrossFieldRule(
            cel="!(has(self.warmupRatio) && has(self.warmupSteps))",
            message="set warmupRatio or warmupSteps, not both",
            check=lambda m: m.warmup_ratio is None or m.warmup_steps is None,
        ),
    )


class GPURequest(ApiModel):
    count: int = Field(
        1, ge=1, le=16,
        description="nvidia.com/gpu requested by each trainer pod; one data-parallel trainer process per GPU.",
    )
    product: str | None = Field(
        None,
        max_length=63,
        pattern=LABEL_VALUE,  # it becomes a nodeSelector value
        description="Required GPU product (the nvidia.com/gpu.product node label, e.g. NVIDIA-H100-80GB-HBM3).",
    )


class Toleration(RuledModel):
    key: str | None = Field(None, max_length=316, pattern=LABEL_KEY)
    operator: Literal["Exists", "Equal"] | None = None
    value: str | None = Field(None, max_length=63, pattern=LABEL_VALUE)
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = None

    # The API server's own rules for a pod's tolerations, checked here so that a QLoRAJob that
    # would make an invalid trainer Job is refused when it is applied, not when its Job is created.
    cross_field_rules = (
        CrossFieldRule(
            cel="!has(self.operator) || self.operator != 'Exists' || !has(self.value) || self.value == ''",
            message="a toleration with operator Exists takes no value",
            check=lambda t: t.operator != "Exists" or not t.value,
            field_path=".value",
        ),
        CrossFieldRule(
            cel="(has(self.key) && self.key != '') || (has(self.operator) && self.operator == 'Exists')",
            message="a toleration without a key needs operator Exists",
            check=lambda t: bool(t.key) or t.operator == "Exists",
            field_path=".operator",
        ),
        CrossFieldRule(
            cel="!has(self.tolerationSeconds) || (has(self.effect) && self.effect == 'NoExecute')",
            message="tolerationSeconds applies only to effect NoExecute",
            check=lambda t: t.toleration_seconds is None or t.effect == "NoExecute",
            field_path=".tolerationSeconds",
        ),
    )


class ResourcesSpec(ApiModel):
    """Where and how the trainer pod runs."""

    gpu: GPURequest = Field(default_factory=GPURequest)
    workers: int = Field(
        1, ge=1, le=64,
        description=(
            "Trainer pods (nodes), each with gpu.count GPUs: the data-parallel group has workers x gpu.count "
            "ranks. Above 1 the operator runs an Indexed Job with a headless Service for the rendezvous; "
            "one lost pod ends the attempt and the next resumes the whole group from the newest checkpoint."
        ),
    )
    cpu: str | None = Field(None, pattern=QUANTITY, max_length=32, description="CPU request, e.g. 8.")
    memory: str | None = Field(
        None, pattern=QUANTITY, max_length=32, description="Memory request and limit, e.g. 64Gi (host RAM, not GPU)."
    )
    node_selector: dict[str, Annotated[str, Field(max_length=63, pattern=LABEL_VALUE)]] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list, max_length=32)
    affinity: dict[str, Any] | None = Field(
        None,
        description="A core/v1 Affinity, passed to the pod as is (validated by the API server when the Job is created).",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )
    priority_class_name: Name | None = None
    runtime_class_name: Name | None = None
    image: str | None = Field(None, max_length=512, pattern=rf"^{NO_SPACE}+$", description="Trainer image override.")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = None
    image_pull_secrets: list[Name] = Field(default_factory=list, max_length=16)


class SecretKeyRefs(ApiModel):
    """A Secret in the QLoRAJob's own namespace holding S3 credentials."""

    name: Name
    access_key_id_key: str = Field("AWS_ACCESS_KEY_ID", max_length=253, pattern=SECRET_KEY)
    secret_access_key_key: str = Field("AWS_SECRET_ACCESS_KEY", max_length=253, pattern=SECRET_KEY)
    session_token_key: str | None = Field(None, max_length=253, pattern=SECRET_KEY)


class OutputSpec(RuledModel):
    """Where the adapter is published; the same S3 connection reads s3:// model and data URIs."""

    bucket: str = Field(pattern=S3_BUCKET, max_length=63)
    prefix: str = Field("adapters", max_length=512, pattern=rf"^([^/\x00-\x20\x7f]{NO_SPACE}*)?$",
                        description="Key prefix inside the bucket (no leading slash, no spaces).")
    endpoint_url: str | None = Field(
        None, pattern=rf"^https?://{NO_SPACE}+$", max_length=512, description="S3-compatible endpoint (MinIO, Ceph, R2)."
    )
    region: str = Field("us-east-1", max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    addressing_style: Literal["auto", "path", "virtual"] = Field("auto", description="path for most MinIO/Ceph setups.")
    credentials_secret_ref: SecretKeyRefs | None = Field(
        None, description="Without it the pod uses ambient credentials (workload identity, instance role)."
    )
    merged_export: bool = Field(False, description="Also publish the adapter merged into a bf16 copy of the base.")

    cross_field_rules = (no_dot_segments("prefix", "prefix"),)


class QLoRAJobSpec(ApiModel):
    """A QLoRA fine-tuning job. Everything but suspend, backoffLimit, activeDeadlineSeconds and
    ttlSecondsAfterFinished is fixed once the job exists."""

    model: ModelSource = Field(json_schema_extra=immutable("spec.model"))
    dataset: DatasetSource = Field(json_schema_extra=immutable("spec.dataset"))
    output: OutputSpec = Field(json_schema_extra=immutable("spec.output"))
    # `default: {}` makes the API server store these sections even when a manifest leaves them out;
    # a transition rule (self == oldSelf) only runs where an old value exists, so without it a
    # later patch could add the section unchecked.
    quantization: QuantizationSpec = Field(default_factory=QuantizationSpec,
                                           json_schema_extra={**immutable("spec.quantization"), "default": {}})
    lora: LoRASpec = Field(default_factory=LoRASpec, json_schema_extra={**immutable("spec.lora"), "default": {}})
    training: TrainingSpec = Field(default_factory=TrainingSpec,
                                   json_schema_extra={**immutable("spec.training"), "default": {}})
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec,
                                     json_schema_extra={**immutable("spec.resources"), "default": {}})
    suspend: bool = Field(False, description="Stop the trainer pod (it resumes from its last checkpoint when unset).")
    backoff_limit: int = Field(2, ge=0, le=20, description="Retries after a retryable failure (pod loss, S3 outage).")
    active_deadline_seconds: int | None = Field(
        None, ge=1, description="Wall-clock limit for the whole job, all attempts together."
    )
    ttl_seconds_after_finished: int | None = Field(
        None, ge=0, description="Delete the finished trainer Job and its pods this long after the end (status stays)."
    )
