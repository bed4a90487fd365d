"""Supervised fine-tuning through trl's SFTTrainer, with the run's own progress, checkpoints and stop.

The data arrives tokenized and packed (data.py), so SFTTrainer skips its own preparation; it still
provides the memory-lean loss (its fused LM head never builds the full logits), token accounting
and the Trainer machinery: paged AdamW, schedules with warm-up, gradient accumulation and
checkpointing, and resumable checkpoints (optimizer, scheduler, RNG and data position).
"""

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from qlora_api import TrainerProgressLine
from qlora_api.protocol import TERMINATION_GRACE_SECONDS
from qlora_api.spec import TrainingSpec
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from trl import SFTConfig, SFTTrainer

from qlora_trainer import distributed, evaluation
from qlora_trainer.acceleration import labels_checked_on_host
from qlora_trainer.checkpoints import CheckpointStore
from qlora_trainer.data import Collator, Example, to_dataset
from qlora_trainer.interruption import Interruption
from qlora_trainer.phases import PhaseClock, folder_bytes
from qlora_trainer.reporting import ProgressReporter, summary

log = logging.getLogger(__name__)

DEFAULT_WARMUP_RATIO = 0.03
# A checkpoint that takes more than this share of the grace period is warned about (see
# CheckpointUpload): a slower store or a bigger adapter would push a SIGTERM's save past the SIGKILL.
GRACE_WARN_SHARE = 0.5
# Dense bf16/fp16 tensor-core peaks (datasheets), for MFU; GPUs not listed report no MFU.
PEAK_FLOPS = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12}


@dataclass
class TrainOutcome:
    seconds: float
    steps: int
    tokens: int
    final_loss: float | None
    peak_gpu_memory_gib: float | None
    tokens_per_second: float | None
    interrupted: bool = False
    progress: list = field(default_factory=list)


def optimizer_name(spec: TrainingSpec) -> str:
    """Paged and 8-bit optimizers need CUDA (paging uses its unified memory); on a CPU, plain AdamW.
    torch's fused AdamW runs on both, so the CPU runs it too (the update the GPU plan uses)."""
    if spec.optimizer not in ("adamw_torch", "adamw_torch_fused") and not torch.cuda.is_available():
        log.warning("optimizer %s needs a GPU; using adamw_torch on the CPU", spec.optimizer)
        return "adamw_torch"
    return spec.optimizer


def sft_config(spec: TrainingSpec, output_dir: Path, dtype: torch.dtype, checkpoints: bool) -> SFTConfig:
    warmup = spec.warmup_steps if spec.warmup_steps is not None else (
        spec.warmup_ratio if spec.warmup_ratio is not None else DEFAULT_WARMUP_RATIO)
    return SFTConfig(
        output_dir=str(output_dir),
        num_train_epochs=spec.epochs,
        max_steps=spec.max_steps or -1,
        learning_rate=spec.learning_rate,
        lr_scheduler_type=spec.scheduler,
        warmup_steps=warmup,  # an int is steps, a float below 1 a fraction of all steps
        per_device_train_batch_size=spec.batch_size,
        per_device_eval_batch_size=spec.batch_size,
        gradient_accumulation_steps=spec.gradient_accumulation_steps,
        gradient_checkpointing=spec.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        optim=optimizer_name(spec),
        weight_decay=spec.weight_decay,
        max_grad_norm=spec.max_grad_norm,
        seed=spec.seed,
        data_seed=spec.seed,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        logging_steps=spec.logging_steps,
        save_strategy="steps" if checkpoints else "no",
        save_steps=max(spec.checkpoint_steps, 1),
        save_total_limit=1,  # local copies only; S3 holds the resumable ones
        eval_strategy="no",  # evaluation runs through evaluation.py (token-weighted), see EvalCallback
        report_to="none",
        disable_tqdm=True,
        include_num_input_tokens_seen="non_padding",
        # LeanSFTTrainer filters non-finite step losses on the device; the Trainer's own filter reads
        # every micro-step's loss on the host (a GPU sync each time)
        logging_nan_inf_filter=False,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        # Batches are collated into pinned memory and copied without waiting: a blocking copy waits
        # for every kernel queued before it, so the host could never run ahead of the GPU
        dataloader_pin_memory=torch.cuda.is_available(),
        accelerator_config={"non_blocking": torch.cuda.is_available()},
        dataset_kwargs={"skip_prepare_dataset": True},
        max_length=None,
        packing=False,  # packed already
        use_cpu=not torch.cuda.is_available(),
        # Data parallel: every LoRA parameter gets a gradient every step, so DDP need not search the
        # graph for unused ones, and the model's buffers (RoPE tables) are the same on every rank.
        ddp_find_unused_parameters=False,
        ddp_broadcast_buffers=False,
    )


class ProgressReport(TrainerCallback):
    """A TrainerProgressLine at every loggingSteps (Trainer's own log events), printed by rank 0.

    The Trainer sums the tokens seen over all ranks, so tokens_per_second is the group's; the
    per-GPU rate divides it by the world size.

    Every line also carries the newest complete checkpoint (and the step this pod resumed from), so
    the status shows where a preempted or evicted pod would resume; a resumed pod says so in a line
    of its own before its first step (the first logging step may be minutes away on a big model)."""

    def __init__(self, reporter: ProgressReporter, flops_per_token: float, peak_flops: float | None,
                 world: distributed.World = distributed.ONE_PROCESS, checkpoints: CheckpointStore | None = None):
        self.reporter = reporter
        self.world = world
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops
        self.checkpoints = checkpoints
        self.eval_loss: float | None = None
        self.lines: list[TrainerProgressLine] = []
        self.checkpoint_step: int | None = None
        self.resumed_from_step: int | None = None
        self._start = self._last_time = None
        self._start_step = self._last_tokens = self.start_tokens = 0

    def checkpoint_saved(self, step: int) -> None:
        """Called once checkpoint `step` is complete in S3 (its manifest written); the next line says so."""
        self.checkpoint_step = step

    def _checkpoint_fields(self) -> dict:
        step = self.checkpoint_step
        # A folder, written as status.result.adapterUri is (with the trailing slash).
        uri = f"{self.checkpoints.folder(step)}/" if step is not None and self.checkpoints is not None else None
        return {"checkpoint_step": step, "checkpoint_uri": uri, "resumed_from_step": self.resumed_from_step}

    def on_train_begin(self, args, state, control, **kwargs):
        self._start = self._last_time = time.monotonic()
        self._start_step = state.global_step
        # After a resume the state holds the earlier attempts' counts: rates count this session only.
        self._last_tokens = self.start_tokens = state.num_input_tokens_seen
        if state.global_step:  # the Trainer loaded a checkpoint's state: this pod resumes there
            self.checkpoint_step = self.resumed_from_step = state.global_step
            if self.world.is_main:
                self.reporter.report(TrainerProgressLine(
                    step=state.global_step, total_steps=state.max_steps,
                    epoch=round(state.epoch, 4) if state.epoch is not None else None, world_size=self.world.size,
                    summary=summary(state.global_step, state.max_steps), **self._checkpoint_fields()))

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "loss" not in logs or self._start is None:
            return
        now = time.monotonic()
        tokens = state.num_input_tokens_seen - self._last_tokens
        tps = tokens / (now - self._last_time) if now > self._last_time else None
        self._last_time, self._last_tokens = now, state.num_input_tokens_seen
        done = state.global_step - self._start_step
        eta = (now - self._start) / done * (state.max_steps - state.global_step) if done else None
        line = TrainerProgressLine(
            step=state.global_step,
            total_steps=state.max_steps,
            epoch=round(state.epoch, 4) if state.epoch is not None else None,
            loss=logs.get("loss"),
            learning_rate=logs.get("learning_rate"),
            eval_loss=self.eval_loss,
            tokens_per_second=round(tps, 1) if tps else None,
            tokens_per_second_per_gpu=round(tps / self.world.size, 1) if tps else None,
            world_size=self.world.size,
            mfu=round(tps / self.world.size * self.flops_per_token / self.peak_flops, 4)
            if tps and self.peak_flops else None,
            gpu_memory_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None,
            eta_seconds=round(eta, 1) if eta is not None else None,
            summary=summary(state.global_step, state.max_steps),
            **self._checkpoint_fields(),
        )
        self.lines.append(line)
        if self.world.is_main:
            self.reporter.report(line)


class EvalCallback(TrainerCallback):
    """Eval loss every evalSteps (token-weighted, evaluation.py), shown in the next progress line."""

    def __init__(self, every: int, rows: list[Example], collator: Collator, batch_size: int, dtype, progress,
                 phases: PhaseClock | None = None):
        self.every, self.rows, self.collator, self.batch_size, self.dtype = every, rows, collator, batch_size, dtype
        self.progress = progress
        self.phases = phases or PhaseClock()

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.rows and state.global_step % self.every == 0:
            counted = {}
            with self.phases.phase("evalDuring") as phase:
                loss = evaluation.eval_loss(model, self.rows, self.collator, self.batch_size, self.dtype, counted)
                phase.tokens, phase.rows = counted.get("tokens"), counted.get("rows")
            self.progress.eval_loss = loss
            log.info("step %d: eval loss %.4f", state.global_step, loss)


class CheckpointUpload(TrainerCallback):
    """Every checkpoint the Trainer writes goes to S3 at once (manifest last): pods are ephemeral.

    Under data parallel rank 0 alone uploads; each rank's own RNG state (rng_state_<rank>.pth, which
    the Trainer writes into that rank's local folder) travels to rank 0 first, so a resumed group
    draws the same dropout masks as one that never stopped.

    A checkpoint holds the LoRA weights, their optimizer state, the scheduler and the RNG states,
    never the base model: its cost (the step, the local save, the upload) is what a SIGTERM needs of
    the pod's grace period, and each one is measured against it (GRACE_WARN_SHARE)."""

    def __init__(self, store: CheckpointStore, world: distributed.World = distributed.ONE_PROCESS,
                 phases: PhaseClock | None = None, interruption: Interruption | None = None,
                 grace_seconds: float = TERMINATION_GRACE_SECONDS, saved=None):
        self.store = store
        self.world = world
        self.phases = phases or PhaseClock()
        self.interruption = interruption or Interruption()
        self.grace_seconds = grace_seconds
        self.saved = saved  # called with the step once a checkpoint is complete in S3 (progress reporting)
        self._step_began: float | None = None

    def on_step_begin(self, args, state, control, **kwargs):
        self._step_began = time.monotonic()

    def on_save(self, args, state, control, **kwargs):
        local = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if self.world.distributed:
            rng = local / f"rng_state_{self.world.rank}.pth"
            states = distributed.gather_to_main(rng.read_bytes() if rng.is_file() else None, self.world)
            if self.world.is_main:
                for rank, body in enumerate(states):
                    if body is not None and not (local / f"rng_state_{rank}.pth").exists():
                        (local / f"rng_state_{rank}.pth").write_bytes(body)
        if self.world.is_main and local.is_dir():
            log.info("uploading checkpoint step %d", state.global_step)
            with self.phases.phase("checkpointUpload") as phase:
                self.store.save(local, state.global_step)
                phase.bytes = folder_bytes(local)
            self._measure(state.global_step, phase.bytes)
            if self.saved is not None:
                self.saved(state.global_step)
        # A SIGTERM that came during this save (the upload is the long part): the checkpoint just
        # completed holds this very step, so stop now instead of training one more step and uploading
        # again inside the grace period. Under data parallel every rank decides together, once rank 0
        # has uploaded (a rank that stopped alone would leave the others waiting for its gradients).
        if distributed.any_rank(self.interruption.requested, self.world):
            self.interruption.requested = True
            control.should_training_stop = True

    def _measure(self, step: int, size: int) -> None:
        """Log how much of the grace period this checkpoint took (from its step's start to its
        manifest); warn when a SIGTERM could not be saved in time: the kubelet's SIGKILL would cut the
        upload, and the run would resume from the checkpoint before (at most checkpointSteps back)."""
        now = time.monotonic()
        cost = now - self._step_began if self._step_began is not None else None
        if self.interruption.requested_at is not None:
            log.warning("checkpoint step %d complete in S3 %.1f s after SIGTERM (grace period %.0f s)",
                        step, now - self.interruption.requested_at, self.grace_seconds)
        if cost is not None and cost > GRACE_WARN_SHARE * self.grace_seconds:
            log.warning("checkpoint step %d (%.1f MB) took %.1f s from its step's start to its manifest, over %d%% of "
                        "the pod's %.0f s grace period: a SIGTERM may not be saved in time, and the run would then "
                        "resume from the checkpoint before", step, size / 1e6, cost, GRACE_WARN_SHARE * 100,
                        self.grace_seconds)


class StopOnInterruption(TrainerCallback):
    """A SIGTERM stops the run at the end of the step; under data parallel every rank stops at the
    same step when any rank got one (distributed.any_rank: one tiny all-reduce per step)."""

    def __init__(self, interruption: Interruption, can_save: bool, world: distributed.World = distributed.ONE_PROCESS):
        self.interruption = interruption
        self.can_save = can_save
        self.world = world

    def on_step_end(self, args, state, control, **kwargs):
        if distributed.any_rank(self.interruption.requested, self.world):
            self.interruption.requested = True
            log.warning("SIGTERM: %s and stopping at step %d",
                        "saving a checkpoint" if self.can_save else "no checkpoint location; not saving", state.global_step)
            control.should_save = self.can_save
            control.should_training_stop = True


def linear_flops_per_token(model) -> float:
    """4·N: forward (2N) and backward through the frozen weights (2N), N the base's matmul weights.

    Not 6N: the frozen 4-bit base has no weight gradients. Attention scores are left out.
    """
    n = 0
    for name, module in model.named_modules():
        if "lora_" in name:
            continue
        if hasattr(module, "in_features") and hasattr(module, "out_features") and hasattr(module, "weight"):
            n += module.in_features * module.out_features
    return 4.0 * n


def peak_flops(dtype: torch.dtype) -> float | None:
    if not torch.cuda.is_available() or dtype == torch.float32:
        return None
    name = torch.cuda.get_device_name()
    for key, value in PEAK_FLOPS.items():  # "H100 PCIe" before "H100"
        if key in name:
            return value
    return None


class LeanSFTTrainer(SFTTrainer):
    """SFTTrainer whose steps between logging steps never read a tensor on the host.

    Each host read (.item(), bool(tensor), a boolean-mask index) waits for all queued GPU work, so
    the host cannot prepare the next step while the GPU runs this one. The stock loop reads, every
    micro-step: the loss (its non-finite filter), the non-padding token count, trl's entropy and
    token-accuracy metrics and token count, and trl's fused LM head selects the labelled positions
    with a boolean mask. Here the loss is the same number, computed and filtered on the device;
    the token count is summed on the device and read once per logging step, checkpoint and end of
    training (the only places anything reads `state.num_input_tokens_seen`); trl's extra metrics
    (entropy, mean_token_accuracy, num_tokens in the Trainer's log dicts, which no progress line
    shows) are not computed. When the fast path installed its own fused cross-entropy
    (acceleration/apply.py), the loss goes through it, as in the benchmark: trl's LM head would
    bypass it and hand the layers fresh position_ids, which keeps them off their CUDA graphs.
    """

    _tokens_on_device: torch.Tensor | None = None  # token counts since the last read, still on the GPU
    _tokens_on_host: int = 0  # and those known without looking (unpadded rows)
    _flops_per_token: int | None = None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if (return_outputs or not self.model.training or self.aux_loss_enabled or self.compute_loss_func is not None
                or self.label_smoother is not None or self.args.loss_type != "nll"):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        inputs["use_cache"] = False
        if getattr(_causal_lm(self.accelerator.unwrap_model(model)), "_qlora_fused_loss", False):
            loss = model(**inputs, num_items_in_batch=num_items_in_batch).loss
        else:  # trl's fused LM head, its loss as trl's compute_loss forms it
            outputs = model(**inputs, fused_lm_head=True)
            num_tokens = outputs.label_mask.sum() if num_items_in_batch is None else num_items_in_batch
            loss = (-outputs.log_probs).sum() / torch.as_tensor(num_tokens).clamp(min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        return loss

    gradient_sync = None  # gradient_sync.GradientSync: data parallel without DDP (the fast path's ranks)

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.gradient_sync is not None and self.accelerator.sync_gradients:
            # the step's last micro-step: average the accumulated gradients before clipping and the optimizer
            self.gradient_sync.all_reduce()
        # The Trainer's logging_nan_inf_filter, on the device: a non-finite step adds the mean of the
        # steps since the last logging step instead (the same number the Trainer's filter adds)
        # (in the running total's dtype, to which the loop adds it either way)
        since = 1 + self.state.global_step - self._globalstep_last_logged
        return torch.where(torch.isfinite(loss), loss.to(self._tr_loss.dtype), self._tr_loss / since)

    def _track_num_input_tokens(self, inputs):
        """The Trainer's non-padding count, kept on the device until read_tokens. Rows without an
        attention mask or positions are unpadded (data.Collator drops the mask then): their count
        is the batch's size, kept on the host (a new device tensor per step would be a blocking copy)."""
        ids = inputs["input_ids"]
        if "attention_mask" in inputs:
            count = inputs["attention_mask"].sum()
        elif "position_ids" in inputs:  # packed rows: the padding is the pad token
            count = (ids != self.processing_class.pad_token_id).sum()
        else:
            self._tokens_on_host += ids.numel()
            return
        count = count.to(torch.int64)
        self._tokens_on_device = count if self._tokens_on_device is None else self._tokens_on_device + count

    def read_tokens(self) -> None:
        """Move the counts into the state: one read (and, under data parallel, one gather on every
        rank: all ranks log, save and finish at the same steps, with the same micro-steps between)."""
        if self._tokens_on_device is None and not self._tokens_on_host:
            return
        pending = torch.tensor(self._tokens_on_host, dtype=torch.int64, device=self.args.device)
        if self._tokens_on_device is not None:
            pending = pending + self._tokens_on_device.to(pending.device)
        self._tokens_on_device, self._tokens_on_host = None, 0
        self.state.num_input_tokens_seen += self.accelerator.gather(pending).sum().item()

    def log(self, logs, start_time=None):
        self.read_tokens()
        super().log(logs, start_time)

    def _save_checkpoint(self, model, trial):
        self.read_tokens()  # the saved state resumes with the right count
        super()._save_checkpoint(model, trial)

    def floating_point_ops(self, inputs):
        """The Trainer's 6 x tokens x parameters, with the parameter count taken once: the model's
        own count walks every parameter and module, every micro-step."""
        tokens = inputs["input_ids"].numel()
        if self._flops_per_token is None:
            self._flops_per_token = int(super().floating_point_ops(inputs)) // max(tokens, 1)
        return self._flops_per_token * tokens

    def _get_grad_norm(self, model, grad_norm=None):
        # with clipping off the Trainer computes the norm only to log it: a pass over every gradient
        if grad_norm is None and self.args.max_grad_norm <= 0:
            return None
        return super()._get_grad_norm(model, grad_norm)


def _causal_lm(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _vocab_rows(lm) -> int | None:
    """The ids a batch may hold: fewer than the rows of both the input embeddings and the LM head
    (a sequence's tokens are the model's inputs and, shifted by one, its labels); None if neither
    is found. (A sharded weight's shape is the whole one: FSDP2's DTensor.)"""
    rows = []
    for get in ("get_input_embeddings", "get_output_embeddings"):
        layer = getattr(lm, get)() if hasattr(lm, get) else None
        weight = getattr(layer, "weight", None)
        if weight is not None and weight.dim() == 2:
            rows.append(int(weight.shape[0]))
    return min(rows) if rows else None


class ResumingSFTTrainer(LeanSFTTrainer):
    """LeanSFTTrainer whose resume keeps the adapter in the dtype it trains in.

    trl trains a QLoRA adapter in bf16 (it casts the LoRA weights once, when the trainer is built);
    the Trainer's resume loads the checkpoint's adapter through peft's load_adapter, which upcasts
    it to fp32. A resumed run then trained at another precision than the run it continues: its
    losses drifted from the uninterrupted run's by about 1e-4 from the first step (and fused kernels
    written for the training dtype would see fp32 weights). The weights are cast back here, before
    the optimizer is built and its state loaded: exact, since the checkpoint holds them in bf16."""

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        target = model if model is not None else self.model
        dtypes = {name: p.dtype for name, p in target.named_parameters() if p.requires_grad}
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        for name, p in target.named_parameters():
            if name in dtypes and p.dtype != dtypes[name]:
                p.data = p.data.to(dtypes[name])


def build_trainer(model, tokenizer, train_rows, eval_rows, spec: TrainingSpec, output_dir: Path, dtype,
                  reporter: ProgressReporter, store: CheckpointStore | None, interruption: Interruption,
                  world: distributed.World = distributed.ONE_PROCESS, phases: PhaseClock | None = None,
                  sharded: bool = False, all_reduce_after_step: bool = False):
    """The SFTTrainer for this run; `sharded`: the model is sharded (sharding.py) and the Trainer
    saves and restores its adapter and optimizer through gathered state dicts. `all_reduce_after_step`
    (data parallel on the fast path): no DistributedDataParallel; the LoRA gradients are averaged
    once per optimizer step instead (gradient_sync.py), so the fused layers keep their CUDA graphs."""
    collator = Collator(tokenizer.pad_token_id, packed=spec.packing, vocab_size=_vocab_rows(_causal_lm(model)))
    if collator.vocab_size is not None:
        # it checks every batch's ids and labels on the host: the fused loss need not read its own
        # check back from the GPU at every micro-step
        labels_checked_on_host(model)
    progress = ProgressReport(reporter, linear_flops_per_token(model), peak_flops(dtype), world, store)
    callbacks = [progress, StopOnInterruption(interruption, store is not None, world)]
    if store is not None:
        callbacks.append(CheckpointUpload(store, world, phases, interruption, saved=progress.checkpoint_saved))
    if spec.eval_steps and eval_rows:
        callbacks.append(EvalCallback(spec.eval_steps, eval_rows, collator, spec.batch_size, dtype, progress, phases))
    trainer_class, extra = ResumingSFTTrainer, {}
    if sharded:
        from qlora_trainer.sharding import sharded_trainer_class

        trainer_class, extra = sharded_trainer_class(ResumingSFTTrainer), {"world": world}
    trainer = trainer_class(
        **extra,
        model=model,
        args=sft_config(spec, output_dir, dtype, checkpoints=store is not None and spec.checkpoint_steps > 0),
        train_dataset=to_dataset(train_rows),
        processing_class=tokenizer,
        data_collator=collator,
        callbacks=callbacks,
    )
    if all_reduce_after_step and world.distributed and not sharded:
        _all_reduce_after_step(trainer, model)
    # Trainer prints its log dicts to stdout; progress lines are the only thing there.
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.progress_report = progress
    return trainer


def _all_reduce_after_step(trainer, model) -> None:
    """Data parallel without DDP: accelerate prepares the model as for evaluation (device placement and
    autocast, no DistributedDataParallel wrapper: its no_sync then does nothing, and none is needed),
    every rank starts from rank 0's adapter, and LeanSFTTrainer.training_step averages the gradients
    after each step's last micro-step."""
    from qlora_trainer.gradient_sync import GradientSync

    sync = GradientSync(model)  # the model, not its parameters: a resume may replace them (peft's load_adapter)
    trainer.gradient_sync = sync
    prepare = trainer.accelerator.prepare_model

    def prepare_unwrapped(model, device_placement=None, evaluation_mode=False):
        if not evaluation_mode:
            # where DDP would broadcast rank 0's weights: as training starts, after trl's bf16 cast
            # and after a resume's checkpoint load (so every rank trains from rank 0's adapter)
            sync.broadcast_parameters()
        return prepare(model, device_placement=device_placement, evaluation_mode=True)

    trainer.accelerator.prepare_model = prepare_unwrapped
    log.info("data parallel without DDP hooks: %s; CUDA graphs stay as planned", sync.describe())


def train(trainer, resume_dir: Path | None, interruption: Interruption) -> TrainOutcome:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.monotonic()
    interruption.training = True
    try:
        output = trainer.train(resume_from_checkpoint=str(resume_dir) if resume_dir else None)
    finally:
        interruption.training = False
    if hasattr(trainer, "read_tokens"):
        trainer.read_tokens()
    seconds = time.monotonic() - start
    tokens = trainer.state.num_input_tokens_seen - trainer.progress_report.start_tokens
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return TrainOutcome(
        seconds=seconds,
        steps=trainer.state.global_step,
        tokens=tokens,
        final_loss=losses[-1] if losses else output.training_loss,
        peak_gpu_memory_gib=torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
        tokens_per_second=tokens / seconds if seconds else None,
        interrupted=interruption.requested,
        progress=trainer.progress_report.lines,
    )
