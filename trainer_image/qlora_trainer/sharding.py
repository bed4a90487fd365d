"""Sharded QLoRA: FSDP2 (torch.distributed.fsdp.fully_shard) over the NF4 base and the adapter.

Why this engine. bitsandbytes stores a 4-bit weight as packed bytes in a flat [n, 1] tensor whose
dtype is `bnb_4bit_quant_storage`, with its quantization state (absmax, code, shape) held beside it
on the module. With a float storage dtype (the compute dtype here), the packed weight is an ordinary
float parameter that FSDP2 can flat-shard along dim 0 and all-gather byte for byte, and bitsandbytes'
Linear4bit restores the quantization state from its module after the gather
(`fix_4bit_weight_quant_state_from_module`). This is what Answer.AI's fsdp_qlora and the PEFT
documentation describe for FSDP1; FSDP2 does the same per parameter, mixes frozen (NF4) and
trainable (LoRA) parameters in one group, and runs on gloo as on NCCL, so the CPU tests exercise the
same code as GPUs. The alternative, torchao's NF4Tensor (which implements FSDP2's pre/post all-gather
hooks, as torchtune uses), would replace bitsandbytes' quantization, and with it the numerics of every
other path and the loading through transformers; it buys nothing that the float-storage route lacks.

What runs sharded: every decoder layer, the input embeddings and the LM head are their own FSDP unit
(all-gathered just before use, freed after: a GPU holds 1/N of the model plus the unit in use), the
root holds the rest. The plain recipe runs (peft LoRA on bitsandbytes, gradient checkpointing on
every layer); frozen floats stay in the compute dtype (no fp32 copies of the embeddings: sharded jobs
are the large ones). Gradients are reduce-scattered and averaged as DDP would, so N sharded ranks
train the loss curve of N data-parallel ones, and of one process with the same effective batch.

Checkpoints hold the gathered LoRA weights (adapter_model.safetensors, as unsharded runs write them)
and the gathered optimizer state (torch.distributed.checkpoint.state_dict's full state dicts: LoRA's
states are small), so a checkpoint resumes on any number of ranks; the scheduler, RNG and trainer
state are the Trainer's own.
"""

from __future__ import annotations

import logging
import os

import torch

from qlora_trainer import distributed

log = logging.getLogger(__name__)

OPTIMIZER_FILE = "optimizer.pt"  # the Trainer's name, so its resume logic finds the file


def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def _decoder_layers(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for attr in ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers"):
        obj = base
        try:
            for part in attr.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        return list(obj)
    raise ValueError(f"no decoder layers found in {type(base).__name__}: cannot shard it")


def shard(model, world: distributed.World):
    """fully_shard every decoder layer, the embeddings and (untied) LM head, then the whole model."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cuda" if torch.cuda.is_available() else "cpu", (world.size,))
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    units = _decoder_layers(model)
    embeddings, head = base.get_input_embeddings(), base.get_output_embeddings()
    tied = head is not None and head.weight is embeddings.weight
    units += [embeddings] + ([] if tied or head is None else [head])
    for unit in units:
        fully_shard(unit, mesh=mesh)
    fully_shard(model, mesh=mesh)
    log.info("sharded over %d ranks (FSDP2): %d units, the NF4 weights flat-sharded as %s", world.size, len(units),
             next(p for n, p in model.named_parameters() if "lora_" not in n and "proj" in n).dtype)
    return model


def prepare_for_sharded_training(model, gradient_checkpointing: bool):
    """What peft's prepare_model_for_kbit_training does, without its fp32 copies of every frozen float
    (the embeddings alone would be 2 x 4 bytes per vocab x hidden, before sharding)."""
    model.enable_input_require_grads()
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def training_spec(training):
    """The TrainingSpec a sharded run trains with: bitsandbytes' optimizers work on raw tensors, not on
    sharded DTensors, so the 32-bit ones become torch's fused AdamW (the same update, as the memory plan
    does); the 8-bit ones too (LoRA's states are small, and split N ways here)."""
    if training.optimizer.startswith("adamw_torch"):
        return training
    log.info("sharded: optimizer %s runs as adamw_torch_fused (the same AdamW update on sharded tensors)",
             training.optimizer)
    return training.model_copy(update={"optimizer": "adamw_torch_fused"})


def _trainable(model):
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def full_adapter_state(model) -> dict:
    """The LoRA parameters, unsharded, on every rank (a collective: every rank calls it)."""
    from torch.distributed.tensor import DTensor

    return {name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().cpu() for name, p in _trainable(model)}


def save_adapter(model, folder, world: distributed.World) -> None:
    """The adapter as peft writes it, from the gathered LoRA weights: rank 0 writes."""
    state = full_adapter_state(model)
    if world.is_main:
        model.save_pretrained(str(folder), state_dict=state)


def load_adapter(model, folder) -> None:
    """Load adapter_model.safetensors (as save_adapter wrote it) into the sharded LoRA parameters;
    every rank reads the whole file and keeps its shard (distribute_tensor cuts it as FSDP2 does)."""
    from safetensors.torch import load_file
    from torch.distributed.tensor import DTensor, distribute_tensor

    saved = load_file(os.path.join(folder, "adapter_model.safetensors"))
    names = {name: name.replace(".default.", ".") for name, _ in _trainable(model)}  # peft drops the adapter name
    missing = [saved_name for saved_name in names.values() if saved_name not in saved]
    if missing:
        raise ValueError(f"{folder} lacks {len(missing)} LoRA tensors (first: {missing[0]})")
    with torch.no_grad():
        for name, p in _trainable(model):
            full = saved[names[name]].to(device=p.device, dtype=p.dtype)
            p.copy_(distribute_tensor(full, p.device_mesh, p.placements) if isinstance(p, DTensor) else full)


def _inner(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the torch optimizer


def save_optimizer(model, optimizer, path, world: distributed.World) -> None:
    """The optimizer state gathered on rank 0 (full state dict keyed by parameter name)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    state = get_optimizer_state_dict(model, _inner(optimizer),
                                     options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if world.is_main:
        torch.save(state, path)


def load_optimizer(model, optimizer, path) -> None:
    """Every rank reads the gathered state and keeps its shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    state = torch.load(path, map_location="cpu", weights_only=True)
    set_optimizer_state_dict(model, _inner(optimizer), optim_state_dict=state,
                             options=StateDictOptions(full_state_dict=True))


def sharded_trainer_class(base):
    """`base` (SFTTrainer) for a model sharded by `shard`: accelerate has no FSDP path on CPUs and
    would re-wrap our shards on GPUs, so the model is prepared as for evaluation (mixed precision,
    no DistributedDataParallel: FSDP2 already reduce-scatters the gradients), and the adapter and
    optimizer are saved and restored through the gathered state dicts above."""

    class ShardedTrainer(base):
        def __init__(self, *args, world: distributed.World, **kwargs):
            super().__init__(*args, **kwargs)
            # Sharded only now: SFTTrainer casts a quantized model's LoRA parameters to bf16 as it
            # starts (the QLoRA paper's recipe), which must happen to the whole tensors, as unsharded.
            shard(self.model, world)
            self.world = world
            prepare = self.accelerator.prepare_model

            def prepare_sharded(model, device_placement=None, evaluation_mode=False):
                return prepare(model, device_placement=False, evaluation_mode=True)

            self.accelerator.prepare_model = prepare_sharded

        def save_model(self, output_dir=None, _internal_call=False):
            output_dir = output_dir or self.args.output_dir
            if self.world.is_main:
                os.makedirs(output_dir, exist_ok=True)
            save_adapter(self.model, output_dir, self.world)
            if self.world.is_main and self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)

        def _save_optimizer_and_scheduler(self, output_dir):
            save_optimizer(self.model, self.optimizer, os.path.join(output_dir, OPTIMIZER_FILE), self.world)
            if self.world.is_main and self.lr_scheduler is not None:
                torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, "scheduler.pt"))

        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            load_adapter(model or self.model, resume_from_checkpoint)

        def _load_optimizer_and_scheduler(self, checkpoint):
            if checkpoint is None:
                return
            load_optimizer(self.model, self.optimizer, os.path.join(checkpoint, OPTIMIZER_FILE))
            scheduler = os.path.join(checkpoint, "scheduler.pt")
            if self.lr_scheduler is not None and os.path.isfile(scheduler):
                self.lr_scheduler.load_state_dict(torch.load(scheduler, weights_only=True))

    return ShardedTrainer
