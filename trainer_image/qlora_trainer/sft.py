"""One QLoRA run, top to bottom: config -> data -> model -> train -> evaluate -> publish.

    qlora-trainer --config /etc/qlora/config.json                 # in the pod
    qlora-trainer --config run.json --termination-log result.json  # anywhere with S3 credentials
    python -m qlora_trainer --config run.json

`main` returns the TrainingResult that cli.py writes to the termination message; failures are
raised as TrainerFailure (errors.py) with the exit code the operator acts on.
"""

import gc
import importlib.metadata
import logging
import tempfile
from pathlib import Path

import torch
from qlora_api import TrainerRunConfig, TrainingResult
from transformers import set_seed

from qlora_trainer import data, evaluation, model_checks, model_loading, publishing, training_loop
from qlora_trainer.acceleration import trainer_hooks
from qlora_trainer.checkpoints import CheckpointStore
from qlora_trainer.errors import interrupted
from qlora_trainer.merged_export import export_merged
from qlora_trainer.publishing import RunLocation
from qlora_trainer.reporting import ProgressReporter
from qlora_trainer.storage import S3Storage
from qlora_trainer.training_loop import Interruption

log = logging.getLogger("qlora_trainer")


def main(cfg: TrainerRunConfig, reporter: ProgressReporter, interruption: Interruption | None = None,
         workdir: Path | None = None) -> TrainingResult:
    spec, interruption = cfg.spec, interruption or Interruption()
    workdir = workdir or Path(tempfile.mkdtemp(prefix="qlora-"))
    log.info("run %s of %s/%s (attempt %d), work folder %s", cfg.run_id, cfg.namespace, cfg.name, cfg.attempt, workdir)

    # Storage first: an unreachable or refusing S3 fails the run in seconds, not after model loading.
    storage = S3Storage(spec.output)
    storage.check_bucket(spec.output.bucket)
    run = RunLocation.of(spec.output.bucket, spec.output.prefix, cfg.namespace, cfg.name, cfg.run_id)
    if (done := publishing.already_published(storage, run)) is not None:
        log.info("%s is already published (an earlier attempt finished); reporting it", run.uri)
        return done

    # Data: checked record by record before the model is downloaded.
    records = data.load_records(spec.dataset, storage, workdir, spec.training.seed)
    model_files = model_loading.fetch_model(
        spec.model, storage, workdir, before_weights=lambda folder: model_checks.check_spec_against_model(folder, spec))
    tokenizer = model_loading.load_tokenizer(model_files, spec.model.trust_remote_code)
    train_rows = data.build_examples(records.train, tokenizer, spec.training, "train")
    eval_rows = data.build_examples(records.eval, tokenizer, spec.training, "eval") if records.eval else []

    # Model: the 4-bit base with a fresh adapter (LoRA B starts at zero, so this is still the base).
    # Memory plan for this GPU before any weights load (a job that cannot fit stops here), and the
    # fast path once the adapter is on: the Trainer runs the plan's micro-batch/accumulation.
    plan = trainer_hooks.plan_before_loading(model_files.path, spec)
    set_seed(spec.training.seed)
    dtype = model_loading.compute_dtype(spec.quantization)
    model = model_loading.load_quantized_model(model_files, spec.model, spec.quantization, spec.training)
    model = model_loading.add_adapter(model, spec.lora)
    planned = trainer_hooks.accelerate(model, plan, spec.training)

    # Train, resuming from the newest complete checkpoint of an earlier attempt.
    store = CheckpointStore(storage, run.checkpoints)
    restored = store.restore_latest(workdir / "trainer")
    resume_dir, resumed_from = restored if restored else (None, None)
    if resumed_from:
        log.info("resuming from checkpoint step %d (%s)", resumed_from, store.folder(resumed_from))
    trainer = training_loop.build_trainer(model, tokenizer, train_rows, eval_rows, planned,
                                          workdir / "trainer", dtype, reporter, store, interruption)
    collator = trainer.data_collator
    loss_before = evaluation.eval_loss(model, eval_rows, collator, spec.training.batch_size, dtype)
    outcome = training_loop.train(trainer, resume_dir, interruption)
    if outcome.interrupted:
        raise interrupted(f"stopped by SIGTERM at step {outcome.steps}; the newest checkpoint is in {run.checkpoints}")
    loss_after = evaluation.eval_loss(model, eval_rows, collator, spec.training.batch_size, dtype)
    log.info("eval loss %s -> %s", _fmt(loss_before), _fmt(loss_after))

    # Publish: adapter + tokenizer, the resolved config and metrics; manifest last.
    adapter_dir = workdir / "adapter"
    model.save_pretrained(str(adapter_dir))
    tokenizer.save_pretrained(str(adapter_dir))
    del trainer, model
    gc.collect()
    merged_dir = (
        export_merged(model_files.path, adapter_dir, workdir / "merged", tokenizer, spec.model.trust_remote_code)
        if spec.output.merged_export else None
    )
    metrics = {
        "eval_loss_before": loss_before,
        "eval_loss_after": loss_after,
        "perplexity_before": evaluation.perplexity(loss_before),
        "perplexity_after": evaluation.perplexity(loss_after),
        "train_seconds": round(outcome.seconds, 2),
        "resumed_from_step": resumed_from,
        "steps": outcome.steps,
        "train_tokens_this_attempt": outcome.tokens,
        "tokens_per_second": outcome.tokens_per_second,
        "final_train_loss": outcome.final_loss,
        "peak_gpu_memory_gib": outcome.peak_gpu_memory_gib,
        "train_rows": len(train_rows),
        "eval_rows": len(eval_rows),
    }
    result = TrainingResult(
        adapter_uri=run.uri,
        base_model=publishing.server_model_name(spec.model.uri),
        base_model_revision=model_files.revision,
        **{k: metrics[k] for k in ("eval_loss_before", "eval_loss_after", "perplexity_before",
                                    "perplexity_after", "train_seconds", "resumed_from_step")},
    )
    return publishing.publish(storage, run, adapter_dir, resolved_config(cfg, dtype, planned, plan), metrics, result,
                              merged_dir, attempt=cfg.attempt)


def resolved_config(cfg: TrainerRunConfig, dtype: torch.dtype, planned=None, plan=None) -> dict:
    """The config as run: the job's spec plus what the trainer decided (the memory plan may have
    re-planned micro-batch, accumulation, recompute and optimizer) and the library versions."""
    training = planned or cfg.spec.training
    versions = {}
    for package in ("torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return {
        "run": cfg.to_wire(),
        "resolved": {
            "computeDtype": str(dtype).removeprefix("torch."),
            "optimizer": training_loop.optimizer_name(training),
            "batchSize": training.batch_size,
            "gradientAccumulationSteps": training.gradient_accumulation_steps,
            "gradientCheckpointing": training.gradient_checkpointing,
            "memoryPlan": plan.describe() if plan is not None else None,
            # the fast path as it ran: the spec's choice after the environment's diagnosis switches,
            # and off wherever no plan was made (a CPU, an architecture the planner cannot read)
            "acceleration": _acceleration_as_run(cfg, plan),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        },
        "versions": versions,
    }


def _acceleration_as_run(cfg: TrainerRunConfig, plan) -> dict:
    choice = trainer_hooks.choose_acceleration(cfg.spec.training.acceleration)
    if plan is None:
        why = choice.why if choice.path == "plain" else "no memory plan (no GPU, or an architecture the planner cannot read)"
        return {"path": "plain", "cudaGraphs": False, "why": why}
    return {"path": "fused" if plan.fused_layers else "perProjection", "cudaGraphs": plan.cuda_graphs,
            "why": choice.why}


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
