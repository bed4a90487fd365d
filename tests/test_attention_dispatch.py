"""The fused layer's attention choice (acceleration/attention.py): cuDNN's dense kernel only for
fixed-length rows, FlashAttention-2 varlen for packed records, SDPA per record off CUDA; and the
[rows, heads, S, D] views the dense kernel reads are the records themselves."""

import torch
import torch.nn.functional as F
from qlora_trainer.acceleration import attention
from qlora_trainer.acceleration.packing import _per_record_sdpa


def _qkv(lens, hq=4, hk=2, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = sum(lens)
    heads = torch.randn(n, (hq + 2 * hk) * d, generator=g).view(n, hq + 2 * hk, d)
    cu = torch.tensor([0] + lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    return heads[:, :hq], heads[:, hq:hq + hk], heads[:, hq + hk:], cu, max(lens)


def test_equal_rows_only_when_every_record_has_the_longest_length():
    assert attention.equal_rows(12, torch.tensor([0, 6, 12], dtype=torch.int32), 6) == 2
    assert attention.equal_rows(4096, torch.arange(0, 4097, 1024, dtype=torch.int32), 1024) == 4
    # packed records of different lengths (same token count, same record count or not)
    assert attention.equal_rows(12, torch.tensor([0, 5, 12], dtype=torch.int32), 7) == 0
    assert attention.equal_rows(12, torch.tensor([0, 4, 8, 12], dtype=torch.int32), 6) == 0
    assert attention.equal_rows(0, torch.tensor([0], dtype=torch.int32), 0) == 0


def test_off_cuda_attention_is_the_per_record_reference_forward_and_backward():
    q, k, v, cu, max_len = _qkv([5, 7, 4])
    assert attention.backend(q.shape[0], cu, max_len, q.device) == "sdpa"
    out, state = attention.forward(q, k, v, cu, max_len, 0.3)
    g = torch.randn_like(out)
    dq, dk, dv = attention.backward(g, q, k, v, out, state, cu, max_len, 0.3)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    ref = _per_record_sdpa(*leaves, cu, 0.3)
    ref_grads = torch.autograd.grad(ref, leaves, g)
    assert torch.equal(out, ref.detach())
    for a, b in zip((dq, dk, dv), ref_grads):
        assert torch.allclose(a, b, atol=1e-6)
    assert attention.describe(q.device) == "per record (SDPA, off CUDA)"


def test_row_views_are_the_records_so_dense_causal_attention_equals_per_record():
    """What the cuDNN path computes, with CPU SDPA in its place: dense causal attention over the
    [rows, heads, S, D] views of the tokens' buffer equals attention record by record, and the
    views share the buffer (no copies)."""
    q, k, v, cu, max_len = _qkv([6, 6, 6], hq=6, hk=2)
    rows = attention.equal_rows(q.shape[0], cu, max_len)
    assert rows == 3
    q4, k4, v4 = (attention._rows(t, rows) for t in (q, k, v))
    assert q4.shape == (3, 6, 6, 8) and k4.shape == (3, 2, 6, 8)
    assert q4.data_ptr() == q.data_ptr() and k4.data_ptr() == k.data_ptr()
    dense = F.scaled_dot_product_attention(q4, k4, v4, is_causal=True, scale=0.25, enable_gqa=True)
    tokens = attention._tokens(dense)
    assert tokens.shape == q.shape
    assert torch.allclose(tokens, _per_record_sdpa(q, k, v, cu, 0.25), atol=1e-6)
    assert torch.equal(attention._tokens(q4), q)
