"""Padding-free batches: packed records in one row, attention that stops at record boundaries.

A batch of rows whose position_ids restart at 0 for each record (the trainer's packed rows, or any
list of records) becomes one row of real tokens with cumulative sequence lengths, and attention
runs per record through PyTorch's variable-length flash attention (`torch.nn.attention.varlen`)
instead of a dense block-diagonal mask over the whole row. Off CUDA the same function loops over
the records with SDPA (the reference the GPU path is checked against).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ATTN_IMPLEMENTATION = "qlora_varlen"
IGNORE = -100


def cu_seqlens_from_positions(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """[1, N] or [N] positions restarting at 0 per record -> int32 cumulative lengths, max length."""
    pos = position_ids.reshape(-1).cpu()
    starts = torch.nonzero(pos == 0).flatten().tolist()
    if not starts or starts[0] != 0:
        starts = [0] + starts
    bounds = starts + [pos.numel()]
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    cu = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    return cu, max(lengths)


def pack_records(records: list[tuple[list[int], list[int]]]) -> dict:
    """Records (input_ids, labels) -> one padding-free row. The first token of every record gets
    no label, so no record learns to predict the next record's first token."""
    ids, labels, positions, lengths = [], [], [], []
    for rec_ids, rec_labels in records:
        ids += rec_ids
        labels += [IGNORE] + list(rec_labels[1:])
        positions += range(len(rec_ids))
        lengths.append(len(rec_ids))
    cu = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    return {
        "input_ids": torch.tensor([ids]),
        "labels": torch.tensor([labels]),
        "position_ids": torch.tensor([positions]),
        "cu_seq_lens_q": cu,
        "cu_seq_lens_k": cu,
        "max_length_q": max(lengths),
        "max_length_k": max(lengths),
    }


def flatten_packed_batch(batch: dict) -> dict:
    """The trainer's packed [B, S] batch (position resets, no attention mask) as one padding-free row.
    Padding at a row's end is a record of its own (positions restart there) and carries no labels."""
    if "position_ids" not in batch or batch.get("attention_mask") is not None:
        return batch
    out = dict(batch)
    for key in ("input_ids", "labels", "position_ids"):
        if key in out and out[key] is not None:
            out[key] = out[key].reshape(1, -1)
    cu, longest = cu_seqlens_from_positions(out["position_ids"])
    out.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest)
    return out


class PaddingFreeCollator:
    """Wraps a collator whose packed batches carry position_ids: returns them flattened, with the
    cumulative lengths the varlen attention reads."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, rows):
        return flatten_packed_batch(self.inner(rows))


def _per_record_sdpa(q, k, v, cu, scale):
    """Reference (and CPU) path: causal SDPA record by record. q, k, v: [N, H, D]."""
    outs = []
    bounds = cu.tolist()
    for a, b in zip(bounds[:-1], bounds[1:]):
        qi, ki, vi = (t[a:b].transpose(0, 1) for t in (q, k, v))
        if ki.shape[0] != qi.shape[0]:
            rep = qi.shape[0] // ki.shape[0]
            ki, vi = ki.repeat_interleave(rep, 0), vi.repeat_interleave(rep, 0)
        outs.append(F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, scale=scale).transpose(0, 1))
    return torch.cat(outs, 0)


_GQA_NATIVE = {"ok": True}


_DEVICE_CU: list = []  # [(host tensor, device tensor)]: one upload per forward, not one per layer


def _on_device(cu: torch.Tensor, device) -> torch.Tensor:
    """A pageable host-to-device copy waits for the GPU to drain; doing it per layer serialises the
    host and the GPU. Upload each cumulative-lengths tensor once (pinned) and reuse it."""
    if cu.device == device:
        return cu
    for host, dev in _DEVICE_CU:
        if host is cu:
            return dev
    dev = cu.pin_memory().to(device, non_blocking=True)
    _DEVICE_CU[:] = [(cu, dev)] + _DEVICE_CU[:1]
    return dev


def _varlen(q, k, v, cu, max_len, scale):
    from torch.nn.attention.varlen import varlen_attn

    cu = _on_device(cu, q.device)
    if k.shape[1] != q.shape[1] and not _GQA_NATIVE["ok"]:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    try:
        return varlen_attn(q, k, v, cu, cu, max_len, max_len, scale=scale, window_size=(-1, 0))
    except RuntimeError:
        if k.shape[1] == q.shape[1]:
            raise
        _GQA_NATIVE["ok"] = False
        return _varlen(q, k, v, cu, max_len, scale)


_CU_CACHE: list = []  # [(position_ids tensor, (cu, max_len))]: one host read per forward, not per layer


def _cu_for(position_ids: torch.Tensor | None, bsz: int, seq: int):
    if position_ids is None:
        cu = torch.arange(0, (bsz + 1) * seq, seq, dtype=torch.int32)
        return cu, seq
    for tensor, result in _CU_CACHE:
        if tensor is position_ids:
            return result
    pos = position_ids.expand(bsz, -1) if position_ids.shape[0] != bsz else position_ids
    # Every row starts a record too: a row that does not restart at 0 is cut at its start.
    flat = pos.reshape(-1).cpu().clone()
    flat[:: seq] = 0
    result = cu_seqlens_from_positions(flat)
    _CU_CACHE[:] = [(position_ids, result)] + _CU_CACHE[:1]
    return result


def varlen_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention interface: query/key/value [B, H, S, D] -> ([B, S, H, D], None).

    Records are delimited by `cu_seq_lens_q` when the batch carries it, else by the resets of
    `position_ids` (the trainer's packed rows), else each row is one record. Rows are right-padded
    or packed, never left-padded, so no padding mask is needed: padding comes after the real tokens
    and causal attention never looks forward.
    """
    bsz, heads, seq, dim = query.shape
    cu = kwargs.get("cu_seq_lens_q")
    if cu is not None:
        max_len = int(kwargs.get("max_length_q") or seq)
    else:
        cu, max_len = _cu_for(kwargs.get("position_ids"), bsz, seq)
    # On an fp32 residual stream q, k and v come out of their projections in fp32 (and RoPE's cos
    # and sin are fp32): all three go in as the compute dtype the layer was given
    # (apply._keep_residual_fp32), as autocast sends the plain recipe's to SDPA. Under autocast
    # they go in as its dtype, as SDPA's would: a LayerNorm runs in fp32 under CUDA autocast, so a
    # GPT-NeoX layer's projections (which return their input's dtype, as bitsandbytes' do) hand
    # it fp32 q, k and v, which the flash kernels refuse (session 20, a NeoX-shaped GPU row).
    dtype = getattr(module, "_qlora_compute_dtype", None) or _autocast_dtype(value)
    q = query.transpose(1, 2).reshape(bsz * seq, heads, dim).to(dtype)
    k = key.transpose(1, 2).reshape(bsz * seq, key.shape[1], dim).to(dtype)
    v = value.transpose(1, 2).reshape(bsz * seq, value.shape[1], dim).to(dtype)
    if q.is_cuda:
        out = _varlen(q, k, v, cu, max_len, scaling)
    else:
        out = _per_record_sdpa(q, k, v, cu, scaling)
    return out.view(bsz, seq, heads, dim), None


def _autocast_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype autocast gives t's device's lower-precision ops when it is on there, else t's."""
    device = t.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else t.dtype


def register_varlen_attention() -> str:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, varlen_attention_forward)
    return ATTN_IMPLEMENTATION
