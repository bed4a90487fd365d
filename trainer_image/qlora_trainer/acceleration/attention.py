"""Causal attention over the fused decoder layer's records: which kernel runs, forward and backward.

q, k, v are [N, heads, D] views of one qkv buffer (kv heads may be fewer than q heads: GQA);
records are given by their cumulative lengths `cu` (int32, on the device) and the longest record
`max_len`. Three paths:
- "cudnn": fixed-length rows (every record `max_len` tokens long, which N == records * max_len
  says on the host without reading `cu`) on a Hopper GPU run through cuDNN's fused flash attention
  as [rows, heads, S, D] strided views of the same buffer (native GQA);
- "varlen": anything else on CUDA (packed records of different lengths) through PyTorch's
  FlashAttention-2 variable-length kernels;
- "sdpa": off CUDA, record by record with SDPA (packing._per_record_sdpa, the reference).
Why cuDNN for fixed-length rows: at the benchmark rows' micro-steps it ran forward + backward
1.5-1.8x faster than FlashAttention-2 on an H200 (8B: 0.224 against 0.379 ms a layer, ~-10 ms an
8B step) with the same error against fp32 (benchmarks/results/attention_timing_h200.md). Its
ragged (cumulative-lengths) entry point crashed there, so packed records keep FlashAttention-2.
QLORA_ATTENTION=varlen keeps FlashAttention-2 for every batch (diagnosis, A/B timing).
"""

from __future__ import annotations

import functools
import logging
import os

import torch

from .packing import _per_record_sdpa

log = logging.getLogger(__name__)

_FAILED: dict = {}  # device index -> why cuDNN was given up (once; FlashAttention-2 from then on)


def equal_rows(n_tokens: int, cu: torch.Tensor, max_len: int) -> int:
    """How many records there are when every one has `max_len` tokens, else 0. Host arithmetic
    only: the lengths sum to n_tokens and none exceeds max_len, so records * max_len == n_tokens
    holds exactly when all are max_len long."""
    records = int(cu.shape[0]) - 1
    return records if records > 0 and max_len > 0 and records * max_len == n_tokens else 0


@functools.lru_cache(maxsize=8)
def _cudnn_usable(device_index: int) -> bool:
    """cuDNN's SDPA on a Hopper GPU (the one it was measured on, sm90)."""
    if not torch.backends.cudnn.is_available() or (torch.backends.cudnn.version() or 0) < 90000:
        return False
    return torch.cuda.get_device_capability(device_index)[0] == 9


def backend(n_tokens: int, cu: torch.Tensor, max_len: int, device: torch.device) -> str:
    """'cudnn', 'varlen' or 'sdpa' (see the module's docstring)."""
    if device.type != "cuda":
        return "sdpa"
    mode = os.environ.get("QLORA_ATTENTION", "auto")
    index = device.index if device.index is not None else torch.cuda.current_device()
    if mode != "varlen" and index not in _FAILED and equal_rows(n_tokens, cu, max_len) and _cudnn_usable(index):
        return "cudnn"
    return "varlen"


def describe(device: torch.device | None) -> str:
    """The acceleration report's words for the attention the fused layers run."""
    if device is None or device.type != "cuda":
        return "per record (SDPA, off CUDA)"
    index = device.index if device.index is not None else torch.cuda.current_device()
    if os.environ.get("QLORA_ATTENTION", "auto") != "varlen" and _cudnn_usable(index):
        return "cuDNN flash (fixed-length rows), varlen flash (packed records)"
    return "varlen flash (per packed record)"


def _rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """[N, H, D] -> [rows, H, S, D], a view (no copy)."""
    n, h, d = t.shape
    return t.view(rows, n // rows, h, d).transpose(1, 2)


def _tokens(t: torch.Tensor) -> torch.Tensor:
    """[rows, H, S, D] -> [N, H, D] (a view when t is laid out [rows, S, H, D])."""
    b, h, s, d = t.shape
    return t.transpose(1, 2).reshape(b * s, h, d)


class _CudnnState(tuple):
    """(logsumexp, philox seed, philox offset, cum_seq_q, cum_seq_k, rows) of a cuDNN forward."""


def forward(q, k, v, cu, max_len, scale):
    """Causal attention per record. Returns (out [N, Hq, D], state for `backward`)."""
    kind = backend(q.shape[0], cu, max_len, q.device)
    if kind == "cudnn":
        rows = equal_rows(q.shape[0], cu, max_len)
        try:
            out, lse, cq, ck, _, _, seed, offset, _ = torch.ops.aten._scaled_dot_product_cudnn_attention(
                _rows(q, rows), _rows(k, rows), _rows(v, rows), None, True, 0.0, True, False, scale=scale)
            return _tokens(out), _CudnnState((lse, seed, offset, cq, ck, rows))
        except RuntimeError as exc:  # an unsupported configuration: FlashAttention-2 from now on
            _FAILED[q.device.index] = str(exc)
            log.warning("cuDNN attention failed, FlashAttention-2 from now on: %s", exc)
            kind = "varlen"
    if kind == "varlen":
        from torch.nn.attention import varlen  # noqa: F401  (importing it registers the torch_attn ops)

        out, lse, rng = torch.ops.torch_attn._varlen_attn(q, k, v, cu, cu, max_len, max_len, True, scale, [-1, 0])
        return out, (lse, rng)
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        out = _per_record_sdpa(*leaves, cu, scale)
    return out.detach(), (leaves, out)


def backward(g, q, k, v, out, state, cu, max_len, scale):
    """(dq, dk, dv), each [N, heads, D], of `forward`'s output for its gradient g."""
    if isinstance(state, _CudnnState):
        lse, seed, offset, cq, ck, rows = state
        s = q.shape[0] // rows
        dq, dk, dv = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            _rows(g.contiguous(), rows), _rows(q, rows), _rows(k, rows), _rows(v, rows), _rows(out, rows), lse,
            seed, offset, None, cq, ck, s, s, 0.0, True, scale=scale)
        return _tokens(dq), _tokens(dk), _tokens(dv)
    if q.is_cuda:
        lse, rng = state
        return torch.ops.torch_attn._varlen_attn_backward(g.contiguous(), q, k, v, out, lse, cu, cu, max_len,
                                                         max_len, True, rng, scale, [-1, 0])
    leaves, graph_out = state
    return torch.autograd.grad(graph_out, leaves, g, retain_graph=True)
