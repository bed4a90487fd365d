"""One QLoRA run, top to bottom: config -> data -> model -> train -> evaluate -> publish.

    qlora-trainer --config /etc/qlora/config.json                 # in the pod
    qlora-trainer --config run.json --termination-log result.json  # anywhere with S3 credentials
    python -m qlora_trainer --config run.json

`main` returns the TrainingResult that cli.py writes to the termination message; failures are
raised as TrainerFailure (errors.py) with the exit code the operator acts on.

Under torchrun (launcher.py) every rank runs `main`: each loads its own 4-bit copy and trains its
share of every batch (distributed.py); rank 0 alone uploads checkpoints, prints progress and
publishes, and the other ranks return None.
"""

from __future__ import annotations

import gc
import importlib.metadata
import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from qlora_api import TrainerRunConfig, TrainingResult

# Light: what a run needs before its model (storage, data, publication). torch, transformers,
# peft and trl import on a thread meanwhile (startup_thread.py) and are imported here only after
# the "startup" phase has waited for them.
from qlora_trainer import data, distributed, model_checks, publishing
from qlora_trainer.checkpoints import CheckpointStore
from qlora_trainer.errors import interrupted
from qlora_trainer.interruption import Interruption
from qlora_trainer.phases import PhaseClock, folder_bytes
from qlora_trainer.publishing import RunLocation
from qlora_trainer.reporting import ProgressReporter
from qlora_trainer.startup_thread import StartupThread
from qlora_trainer.storage import S3Storage

if TYPE_CHECKING:
    import torch

    from qlora_trainer.acceleration import trainer_hooks

log = logging.getLogger("qlora_trainer")

# What _run imports once its data is in (its "startup" phase), imported first on the start-up
# thread, heaviest first (torch alone is about a third). In step with that import block
# (tests/test_startup_thread.py checks both ways).
TRAINING_MODULES = (
    "torch",
    "transformers",
    "peft",
    "trl",
    "qlora_trainer.training_loop",
    "qlora_trainer.model_loading",
    "qlora_trainer.evaluation",
    "qlora_trainer.sharding",
    "qlora_trainer.merged_export",
    "qlora_trainer.acceleration.trainer_hooks",
)


def main(cfg: TrainerRunConfig, reporter: ProgressReporter, interruption: Interruption | None = None,
         workdir: Path | None = None, phases: PhaseClock | None = None) -> TrainingResult | None:
    world = distributed.World.from_env()
    # First: the imports and the GPU's warm-up, on a thread that the downloads below hide.
    startup = StartupThread.start(world.local_rank, TRAINING_MODULES)
    phases = phases or PhaseClock(reporter)
    if not world.is_main:
        phases.reporter = None  # rank 0 alone prints on stdout (its log lines stay)
    distributed.join(world)
    try:
        return _run(cfg, reporter, interruption or Interruption(), workdir, world, phases, startup)
    finally:
        distributed.leave(world)


def _run(cfg: TrainerRunConfig, reporter: ProgressReporter, interruption: Interruption, workdir: Path | None,
         world: distributed.World, phases: PhaseClock, startup: StartupThread) -> TrainingResult | None:
    # Each rank trains its share of the spec's effective batch (distributed.per_rank_training).
    spec = cfg.spec.model_copy(update={"training": distributed.per_rank_training(cfg.spec.training, world)})
    workdir = workdir / f"rank-{world.rank}" if workdir and world.distributed else workdir
    workdir = workdir or Path(tempfile.mkdtemp(prefix="qlora-"))
    log.info("run %s of %s/%s (attempt %d), %s, work folder %s", cfg.run_id, cfg.namespace, cfg.name, cfg.attempt,
             world.describe(), workdir)
    # Storage first: an unreachable or refusing S3 fails the run in seconds, not after model loading.
    with phases.phase("checkStorage"):
        storage = S3Storage(spec.output)
        storage.check_bucket(spec.output.bucket)
        run = RunLocation.of(spec.output.bucket, spec.output.prefix, cfg.namespace, cfg.name, cfg.run_id)
        # Rank 0 decides for everyone: ranks that looked on their own could see different answers.
        done = distributed.broadcast(publishing.already_published(storage, run) if world.is_main else None, world)
    if done is not None:
        log.info("%s is already published (an earlier attempt finished); reporting it", run.uri)
        return done if world.is_main else None

    # Data: checked record by record before the model is downloaded.
    with phases.phase("downloadData") as phase:
        records = data.load_records(spec.dataset, storage, workdir, spec.training.seed)
        phase.bytes = sum(folder_bytes(workdir / d) for d in ("data", "eval-data") if (workdir / d).exists())
        phase.rows = len(records.train) + len(records.eval)
    # The training libraries imported (and the GPU warmed) on a thread since the run began: a wrong
    # bucket or a bad record failed above without waiting for them.
    with phases.phase("startup"):
        startup.wait()
        from transformers import set_seed

        from qlora_trainer import evaluation, model_loading, sharding, training_loop
        from qlora_trainer.acceleration import trainer_hooks
        from qlora_trainer.merged_export import export_merged
    # The spec is checked against the model's config, and the memory plan made for this world (data
    # parallel or sharded), before any weight is downloaded: a job no GPU count here can hold fails now.
    layouts: list[trainer_hooks.Layout] = []

    def before_weights(folder):
        model_checks.check_spec_against_model(folder, spec)
        layouts.append(trainer_hooks.plan_layout(folder, spec, world.size, device=world.local_rank))

    with phases.phase("downloadModel") as phase:
        model_files = model_loading.fetch_model(spec.model, storage, workdir, before_weights=before_weights)
        if Path(model_files.path).exists():
            phase.bytes = folder_bytes(model_files.path)
    # Loading the tokenizer is a phase of its own: "tokenize" is the pass over the records that
    # benchmarks/trainer_cli_speed.py compares with a batched tokenizer call
    with phases.phase("loadTokenizer"):
        tokenizer = model_loading.load_tokenizer(model_files, spec.model.trust_remote_code)
    with phases.phase("tokenize") as phase:
        train_rows = data.build_examples(records.train, tokenizer, spec.training, "train")
        eval_rows = data.build_examples(records.eval, tokenizer, spec.training, "eval") if records.eval else []
        phase.tokens = sum(len(r.input_ids) for r in (*train_rows, *eval_rows))
        phase.rows = len(train_rows) + len(eval_rows)
    # Every evaluation scores the same bounded sample (spec.training.evalMaxTokens).
    eval_scored = evaluation.eval_sample(eval_rows, spec.training.eval_max_tokens, spec.training.seed)

    # Model: the 4-bit base with a fresh adapter (LoRA B starts at zero, so this is still the base).
    # Memory plan for this GPU before any weights load (a job that cannot fit stops here), and the
    # fast path once the adapter is on: the Trainer runs the plan's micro-batch/accumulation.
    # Each rank plans for its own GPU (the per-rank batch) and loads its own copy onto it.
    with phases.phase("planMemory"):
        layout = layouts[-1] if layouts else trainer_hooks.plan_layout(model_files.path, spec, world.size,
                                                                       device=world.local_rank)
        plan, sharded = layout.plan, layout.mode == "sharded"
    set_seed(spec.training.seed)
    dtype = model_loading.compute_dtype(spec.quantization)
    with phases.phase("quantize") as phase:  # read the weights, quantize to 4 bits, place on the GPU
        model = model_loading.load_quantized_model(model_files, spec.model, spec.quantization, spec.training,
                                                   device_map=distributed.device_map(world), sharded=sharded,
                                                   phases=phases)
        phase.params = sum(p.numel() for p in model.parameters())
        phase.bytes = folder_bytes(model_files.path) if Path(model_files.path).exists() else None
    with phases.phase("prepareAdapter"):
        model = model_loading.add_adapter(model, spec.lora)
        gradient_sync = None
        if sharded:  # the plain recipe; the Trainer shards the 4-bit base and adapter (sharding.py)
            planned = sharding.training_spec(spec.training)
        else:
            # The plan as it runs (under DDP without CUDA graphs): what training_config.json reports.
            gradient_sync = trainer_hooks.gradient_sync_mode(plan, world.distributed)
            plan = trainer_hooks.for_data_parallel(plan, world.distributed)
            planned = trainer_hooks.accelerate(model, plan, spec.training, data_parallel=world.distributed)

    # Train, resuming from the newest complete checkpoint of an earlier attempt: rank 0 picks it
    # (checked against its manifest) and every other rank downloads that same step.
    store = CheckpointStore(storage, run.checkpoints)
    with phases.phase("restoreCheckpoint") as phase:
        restored = store.restore_latest(workdir / "trainer") if world.is_main else None
        resumed_from = distributed.broadcast(restored[1] if restored else None, world)
        resume_dir = restored[0] if restored else (
            store.restore(resumed_from, workdir / "trainer") if resumed_from is not None else None)
        phase.bytes = folder_bytes(resume_dir) if resume_dir else 0
    if resumed_from is not None and resume_dir is None:
        raise interrupted(f"rank {world.rank} could not read checkpoint step {resumed_from}; the group restarts")
    if resumed_from:
        log.info("resuming from checkpoint step %d (%s)", resumed_from, store.folder(resumed_from))
    with phases.phase("buildTrainer"):
        trainer = training_loop.build_trainer(model, tokenizer, train_rows, eval_scored, planned,
                                              workdir / "trainer", dtype, reporter, store, interruption, world,
                                              phases, sharded=sharded,
                                              all_reduce_after_step=gradient_sync == trainer_hooks.ALL_REDUCE_AFTER_STEP)
    collator = trainer.data_collator
    counted_before, counted_after = {}, {}
    with phases.phase("evalBefore") as phase:
        loss_before = evaluation.eval_loss(model, eval_scored, collator, spec.training.batch_size, dtype,
                                           counted_before)
        phase.tokens, phase.rows = counted_before.get("tokens"), counted_before.get("rows")
    with phases.phase("train") as phase:
        outcome = training_loop.train(trainer, resume_dir, interruption)
        phase.tokens = outcome.tokens
    if outcome.interrupted:
        raise interrupted(f"stopped by SIGTERM at step {outcome.steps}; the newest checkpoint is in {run.checkpoints}")
    # Sharded, every forward is a collective: every rank evaluates and gathers the adapter with rank 0.
    if not world.is_main and not sharded:
        return None  # one publisher: rank 0
    with phases.phase("evalAfter") as phase:
        loss_after = evaluation.eval_loss(model, eval_scored, collator, spec.training.batch_size, dtype,
                                          counted_after)
        phase.tokens, phase.rows = counted_after.get("tokens"), counted_after.get("rows")
    log.info("eval loss %s -> %s", _fmt(loss_before), _fmt(loss_after))

    # Publish: adapter + tokenizer, the resolved config and metrics; manifest last.
    adapter_dir = workdir / "adapter"
    with phases.phase("saveAdapter") as phase:
        if sharded:
            sharding.save_adapter(model, adapter_dir, world)
        else:
            model.save_pretrained(str(adapter_dir))
        if not world.is_main:
            return None  # one publisher: rank 0
        tokenizer.save_pretrained(str(adapter_dir))
        phase.bytes = folder_bytes(adapter_dir)
    del trainer, model
    gc.collect()
    merged_dir = None
    if spec.output.merged_export:
        with phases.phase("exportMerged") as phase:
            merged_dir = export_merged(model_files.path, adapter_dir, workdir / "merged", tokenizer,
                                       spec.model.trust_remote_code)
            phase.bytes = folder_bytes(merged_dir)
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
        "world_size": world.size,
        "tokens_per_second_per_gpu": outcome.tokens_per_second / world.size if outcome.tokens_per_second else None,
        "final_train_loss": outcome.final_loss,
        "peak_gpu_memory_gib": outcome.peak_gpu_memory_gib,
        "train_rows": len(train_rows),
        "eval_rows": len(eval_rows),
        # what each evaluation scored: a sample of at most evalMaxTokens tokens (0: every row)
        "eval_rows_scored": counted_after.get("rows", 0),
        "eval_tokens_scored": counted_after.get("tokens", 0),
        "eval_max_tokens": spec.training.eval_max_tokens,
    }
    result = TrainingResult(
        adapter_uri=run.uri,
        base_model=publishing.server_model_name(spec.model.uri),
        base_model_revision=model_files.revision,
        **{k: metrics[k] for k in ("eval_loss_before", "eval_loss_after", "perplexity_before",
                                    "perplexity_after", "train_seconds", "resumed_from_step")},
    )
    interruption.publishing = True  # a SIGTERM from here on lets the publication finish (cli.py)
    try:
        config = resolved_config(cfg, dtype, planned, plan, world, layout, gradient_sync)
        return publishing.publish(storage, run, adapter_dir, config, metrics, result, merged_dir, phases=phases,
                                  attempt=cfg.attempt)
    finally:
        interruption.publishing = False


def resolved_config(cfg: TrainerRunConfig, dtype: torch.dtype, planned=None, plan=None,
                    world: distributed.World | None = None, layout: trainer_hooks.Layout | None = None,
                    gradient_sync: str | None = None) -> dict:
    """The config as run: the job's spec plus what the trainer decided (the memory plan may have
    re-planned micro-batch, accumulation, recompute and optimizer) and the library versions."""
    import torch

    from qlora_trainer import training_loop
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
            "worldSize": world.size if world else 1,  # batchSize x accumulation x worldSize = effective batch
            "memoryPlan": layout.describe() if layout is not None and layout.mode == "sharded" else (
                plan.describe() if plan is not None else None),
            # single | dataParallel | sharded, and why (spec.training.parallelism, or what fitted)
            # and, data parallel, how the ranks average gradients (allReduceAfterStep: once per step,
            # no DDP hooks, CUDA graphs on; ddp: DistributedDataParallel)
            "parallelism": {"mode": layout.mode, "why": layout.why,
                            **({"gradients": gradient_sync} if gradient_sync else {})} if layout is not None else None,
            # the fast path as it ran: the spec's choice after the environment's diagnosis switches,
            # and off wherever no plan was made (a CPU, an architecture the planner cannot read)
            "acceleration": _acceleration_as_run(cfg, plan, layout),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        },
        "versions": versions,
    }


def _acceleration_as_run(cfg: TrainerRunConfig, plan, layout=None) -> dict:
    from qlora_trainer.acceleration import trainer_hooks

    choice = trainer_hooks.choose_acceleration(cfg.spec.training.acceleration)
    if layout is not None and layout.mode == "sharded":
        return {"path": "plain", "cudaGraphs": False, "why": "sharded (FSDP2 over NF4): the plain recipe"}
    if plan is None:
        why = choice.why if choice.path == "plain" else "no memory plan (no GPU, or an architecture the planner cannot read)"
        return {"path": "plain", "cudaGraphs": False, "why": why}
    why = choice.why
    if choice.cuda_graphs and not plan.cuda_graphs:
        why = trainer_hooks.NO_GRAPHS_UNDER_DDP
    return {"path": "fused" if plan.fused_layers else "perProjection", "cudaGraphs": plan.cuda_graphs,
            "memory": plan.policy, "why": why}  # memory: the policy the plan took (auto may turn lean)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
