"""Data parallel through torch.distributed: one process per GPU (or CPU worker), started by torchrun.

torchrun (launcher.py) gives every process RANK, LOCAL_RANK and WORLD_SIZE; this module reads them,
joins the process group (NCCL on GPUs, gloo on CPUs) before the Trainer does, so the run can agree
on things before training starts, and holds the few collective decisions the run makes:

- every rank loads its own 4-bit copy on its local device; the Trainer (accelerate) wraps the model
  in DistributedDataParallel, which all-reduces the LoRA gradients;
- the job's effective batch stays the spec's (`per_rank_training`);
- rank 0 picks the checkpoint to resume from and everyone loads that one (`broadcast`);
- a SIGTERM seen by any rank stops every rank at the same step (`any_rank`);
- rank 0 alone uploads checkpoints, publishes and prints progress lines.

With spec.training.parallelism sharded (or auto, when only sharding fits) the ranks share one
sharded model instead of holding a copy each (sharding.py); the rest above holds as it is.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class World:
    rank: int = 0
    local_rank: int = 0
    size: int = 1

    @classmethod
    def from_env(cls, env=os.environ) -> World:
        """The process's place in the group, from the variables torchrun sets (one process if none)."""
        return cls(int(env.get("RANK", 0)), int(env.get("LOCAL_RANK", 0)), int(env.get("WORLD_SIZE", 1)))

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> str:
        return f"rank {self.rank} of {self.size} (local rank {self.local_rank})"


ONE_PROCESS = World()


def join(world: World) -> None:
    """Join the process group before anything touches the GPU: NCCL on GPUs, gloo on CPUs. accelerate
    finds it initialized and uses it, so the Trainer's DDP and our own broadcasts share one group."""
    if not world.distributed:
        return
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(world.local_rank)
        dist.init_process_group("nccl", device_id=torch.device("cuda", world.local_rank))
    else:
        # accelerate would name this rank's device cpu:<index>, and the Trainer loads a resumed
        # optimizer state with that map_location, which torch 2.11 (the image's) cannot restore
        os.environ.setdefault("ACCELERATE_TORCH_DEVICE", "cpu")
        dist.init_process_group("gloo")
    log.info("joined the process group as %s (%s)", world.describe(), dist.get_backend())


def leave(world: World) -> None:
    if world.distributed:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def device_map(world: World):
    """Where this rank's copy of the 4-bit model lives: its own GPU, or the CPU."""
    import torch

    return {"": world.local_rank} if torch.cuda.is_available() else "cpu"


def per_rank_training(training, world: World):
    """The spec's batchSize x gradientAccumulationSteps is the job's effective batch on any number
    of GPUs: with N ranks, each accumulates 1/N of the micro-batches. When N does not divide the
    accumulation, the micro-batch is divided instead; when neither divides, every rank runs the
    spec's settings and the effective batch is N times the spec's (logged; the learning rate and
    schedule are the spec's, over N times fewer optimizer steps per epoch)."""
    if not world.distributed:
        return training
    batch, accum, n = training.batch_size, training.gradient_accumulation_steps, world.size
    if accum % n == 0:
        update = {"gradient_accumulation_steps": accum // n}
    elif batch % n == 0:
        update = {"batch_size": batch // n}
    else:
        log.warning("%d ranks divide neither batchSize %d nor gradientAccumulationSteps %d: every rank runs "
                    "%d x %d, so the effective batch is %d, not the spec's %d", n, batch, accum, batch, accum,
                    batch * accum * n, batch * accum)
        return training
    planned = training.model_copy(update=update)
    log.info("data parallel over %d ranks: %d x %d per rank x %d ranks = the spec's effective batch %d",
             n, planned.batch_size, planned.gradient_accumulation_steps, n, batch * accum)
    return planned


def broadcast(value, world: World):
    """Rank 0's value on every rank (a picklable object)."""
    if not world.distributed:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def any_rank(flag: bool, world: World) -> bool:
    """True on every rank if it is True on any: ranks must stop at the same step, or the ones that
    go on wait forever for the gradients of the ones that stopped."""
    if not world.distributed:
        return flag
    import torch
    import torch.distributed as dist

    device = torch.device("cuda", world.local_rank) if dist.get_backend() == "nccl" else torch.device("cpu")
    value = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def gather_to_main(value, world: World) -> list | None:
    """Every rank's value, on rank 0 (None elsewhere)."""
    if not world.distributed:
        return [value]
    import torch.distributed as dist

    out = [None] * world.size if world.is_main else None
    dist.gather_object(value, out, dst=0)
    return out
