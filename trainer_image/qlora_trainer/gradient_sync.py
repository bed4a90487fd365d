"""Data parallel for the fast path: the accumulated LoRA gradients all-reduced once per optimizer step.

DistributedDataParallel all-reduces from autograd hooks on every parameter as its gradient lands.
The fast path replays each fused decoder layer's backward as a CUDA graph (cuda_graphs.py) that adds
the LoRA gradients into static .grad buffers inside the graph: no hook sees them, so under DDP the
graphs had to be switched off, and every rank then ran the host-bound eager layers (on two H200s
the 7B row reached 1.63x one GPU). Here the model is not wrapped at all: every rank accumulates its
own micro-steps (graphed or eager, nothing to skip: there are no hooks, so no no_sync is needed),
and after the last micro-step of an optimizer step the gradients are averaged across the ranks
with torch.distributed.all_reduce, a few buckets at a time, before clipping and the optimizer see
them. This is what DDP computes (the mean of the ranks' gradients, in the gradients' own dtype), so
the loss curve is the same; only where the collective is issued differs.

The LoRA adapter is ~40M parameters on a 7B model (80 MB of bf16 gradients, about 1 ms over NVLink),
so one all-reduce after the backward costs little against a step of half a second; the buckets
are issued back to back (async) so one bucket's flatten overlaps the previous one's reduction.
Every rank also starts from rank 0's adapter (DDP broadcasts it when it wraps the model).
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

BUCKET_BYTES = 64 * 2**20  # per all-reduce: large enough to run near link speed, small enough to pipeline


class GradientSync:
    """Average the gradients of `params` across the default process group (NCCL or gloo)."""

    def __init__(self, source, bucket_bytes: int = BUCKET_BYTES):
        """`source`: the model (its trainable parameters are looked up on every use: a resume loads the
        checkpoint's adapter through peft, which may put new Parameter objects in the model), or a
        fixed list of parameters."""
        import torch.distributed as dist

        self.source = source if isinstance(source, torch.nn.Module) else [p for p in source if p.requires_grad]
        self.world = dist.get_world_size()
        self.backend = dist.get_backend()
        self.bucket_bytes = bucket_bytes
        self.reductions = 0  # optimizer steps whose gradients were all-reduced (tests read it)

    @property
    def params(self) -> list[torch.Tensor]:
        if isinstance(self.source, torch.nn.Module):
            return [p for p in self.source.parameters() if p.requires_grad]
        return self.source

    @property
    def buckets(self) -> list[list[torch.Tensor]]:
        # made on each use: the Trainer casts the adapter to bf16 after this object exists (trl's QLoRA
        # recipe), and a bucket holds one dtype; a few hundred tensors, microseconds
        return _buckets(self.params, self.bucket_bytes)

    def describe(self) -> str:
        size = sum(p.numel() * p.element_size() for p in self.params)
        return (f"{len(self.params)} LoRA tensors ({size / 2**20:.1f} MiB of gradients) all-reduced over "
                f"{self.world} ranks in {len(self.buckets)} bucket(s) after each step's last micro-step")

    @torch.no_grad()
    def broadcast_parameters(self) -> None:
        """Rank 0's adapter on every rank, as DDP does when it wraps a model (one collective per bucket)."""
        import torch.distributed as dist

        for bucket in self.buckets:
            flat = torch._utils._flatten_dense_tensors([p.detach() for p in bucket])
            dist.broadcast(flat, src=0)
            torch._foreach_copy_([p.detach() for p in bucket],
                                 torch._utils._unflatten_dense_tensors(flat, bucket))

    @torch.no_grad()
    def all_reduce(self) -> None:
        """Replace every gradient by the mean over the ranks. A parameter without a gradient on this
        rank contributes zeros (every rank must issue the same collectives, or the group hangs)."""
        import torch.distributed as dist

        pending = []
        for bucket in self.buckets:
            grads = []
            for p in bucket:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                grads.append(p.grad)
            flat = torch._utils._flatten_dense_tensors(grads)
            # NCCL averages in the collective; gloo has no AVG (sum, then divide)
            op = dist.ReduceOp.AVG if self.backend == "nccl" else dist.ReduceOp.SUM
            pending.append((dist.all_reduce(flat, op=op, async_op=True), flat, grads))
        for work, flat, grads in pending:
            work.wait()  # the compute stream waits for the reduction, the host does not
            if self.backend != "nccl":
                flat.div_(self.world)
            torch._foreach_copy_(grads, torch._utils._unflatten_dense_tensors(flat, grads))
        self.reductions += 1


def _buckets(params, bucket_bytes: int) -> list[list[torch.Tensor]]:
    """Consecutive parameters of one dtype and device, up to `bucket_bytes` each (at least one
    parameter). Reversed: the last layers' gradients are the first ones ready in a backward."""
    buckets: list[list[torch.Tensor]] = []
    size = 0
    for p in reversed(params):
        nbytes = p.numel() * p.element_size()
        last = buckets[-1] if buckets else None
        if last is None or size + nbytes > bucket_bytes or last[0].dtype != p.dtype or last[0].device != p.device:
            buckets.append([p])
            size = nbytes
        else:
            last.append(p)
            size += nbytes
    return buckets
