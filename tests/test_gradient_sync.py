"""gradient_sync.GradientSync over gloo with two real processes: after all_reduce every rank holds the
mean of the ranks' gradients (what DDP computes), across several buckets and dtypes, a missing
gradient counts as zeros, and broadcast_parameters gives every rank rank 0's weights."""

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _rank(rank: int, world: int, init_file: str, out: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        from qlora_trainer.gradient_sync import GradientSync

        g = torch.Generator().manual_seed(100 + rank)  # different weights and gradients on every rank
        params = [torch.nn.Parameter(torch.randn(n, generator=g, dtype=dtype))
                  for n, dtype in ((300, torch.float32), (50, torch.float32), (200, torch.bfloat16), (7, torch.float32))]
        frozen = torch.nn.Parameter(torch.ones(3), requires_grad=False)
        for i, p in enumerate(params):
            if i != 3 or rank == 0:  # the last one has a gradient on rank 0 only
                p.grad = torch.randn(p.shape, generator=g).to(p.dtype)
        sync = GradientSync([*params, frozen], bucket_bytes=1024)  # 1 KiB: several buckets
        mine = {"grads": [None if p.grad is None else p.grad.clone() for p in params], "buckets": len(sync.buckets)}
        sync.all_reduce()
        sync.broadcast_parameters()
        mine.update(after=[p.grad.clone() for p in params], weights=[p.detach().clone() for p in params],
                    reductions=sync.reductions, frozen_grad=frozen.grad)
        out[rank] = mine  # one assignment: the manager's dict does not see changes inside its values
    finally:
        dist.destroy_process_group()


def test_all_reduce_averages_gradients_and_broadcast_copies_rank_zeros_weights(tmp_path):
    world = 2
    with mp.Manager() as manager:
        out = manager.dict()
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        mp.spawn(_rank, args=(world, str(tmp_path / "init"), out), nprocs=world, join=True)
        out = dict(out)
    assert out[0]["buckets"] >= 3  # split by size and by dtype
    for i in range(4):
        before = [out[r]["grads"][i] for r in range(world)]
        dtype = out[0]["after"][i].dtype
        expected = sum(torch.zeros_like(out[0]["after"][i], dtype=torch.float32) if b is None else b.float()
                       for b in before) / world
        for r in range(world):
            assert torch.allclose(out[r]["after"][i].float(), expected, atol=1e-2 if dtype == torch.bfloat16 else 1e-6)
            assert torch.equal(out[r]["weights"][i], out[0]["weights"][i])  # rank 0's weights everywhere
        assert not torch.equal(out[0]["after"][i], out[0]["grads"][i])  # it changed something
    assert out[0]["reductions"] == out[1]["reductions"] == 1
    assert out[0]["frozen_grad"] is None  # frozen parameters take no part
