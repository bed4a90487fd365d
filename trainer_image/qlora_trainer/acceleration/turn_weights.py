"""Weights kept across the turn: a graphed layer's bf16 weights, dequantized for its backward, kept
for the next micro-step's forward in memory that the layers above it are not using then.

A training step with accumulation visits the decoder layers up and down: F0..F31, B31..B0, F0..F31,
B31..B0, F0 (the next step). The backward of layer L and the next forward of layer L both
dequantize L's NF4 weights, with only the layers below L in between. Meanwhile the activations that
the layers above L saved for their backward are dead: their backward has run, and their next
forward has not. So B(L) dequantizes into a buffer laid over those activations (an "arena" that
holds both), and F(L) uses the weights as they are instead of dequantizing again. Nothing is
allocated for it: the activations were in memory anyway, now at fixed places of the arena.

What may hold layer L's weights (cuda_graphs.py writes and reads them in this order):
- the saved gate|up, MLP-block input (y) and q|k|v of any layer s > L: written by F(s) after F(L),
  read by B(s) before B(L);
- the chained input buffer of layer s >= L + 2 (written by F(s - 1), which for s = L + 1 is F(L)
  itself, writing its own output).
Each layer's weights take one contiguous region (four matrices, each contiguous), so they can
straddle several activations. A device flag per layer says whether its region still holds its
weights: set by B(L), cleared by F(L), which dequantizes (into the same region) only when it is
clear (the first micro-step, or a forward that did not follow this layer's backward).

Pure Python (the planner prices it before torch loads): `plan_layout` places the regions,
`kept_across_turn` counts the layers it serves for a model shape.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

ALIGN = 512  # bytes: every piece and matrix starts where the CUDA caching allocator would start one
# The activations a layer's region may lie over, and how far below their owner the layers they may
# serve end: (kind, offset below the owner's index). "x_in" is the chained input buffer.
ACTIVATION_KINDS = (("gate_up", 1), ("y", 1), ("qkv", 1), ("x_in", 2))
WEIGHT_KINDS = ("qkv", "o", "gate_up", "down")


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


@dataclass(frozen=True)
class Piece:
    layer: int
    kind: str
    nbytes: int

    @property
    def serves_up_to(self) -> int:
        """The highest layer whose weights may lie over this activation."""
        return self.layer - dict(ACTIVATION_KINDS)[self.kind]


@dataclass
class TurnLayout:
    """Where each activation piece and each kept layer's weights sit in the arena (byte offsets)."""

    size: int = 0
    pieces: dict = field(default_factory=dict)  # (layer, kind) -> offset
    weights: dict = field(default_factory=dict)  # layer -> {kind: offset}

    @property
    def kept(self) -> list[int]:
        return sorted(self.weights)


def plan_layout(pieces: list[Piece], weight_bytes: dict[int, dict[str, int]]) -> TurnLayout:
    """Lay the pieces out by the highest layer each may serve, then the candidate layers' weights
    (`weight_bytes`: layer -> kind -> bytes) one after another, lowest layer first, each region
    starting no earlier than the first piece that may serve it. Stops at the first layer that does
    not fit; the arena ends with the last piece a region overlaps (the rest stay where they were)."""
    usable = sorted((p for p in pieces if p.serves_up_to >= 0), key=lambda p: (p.serves_up_to, p.layer, p.kind))
    starts, offset = [], 0
    for p in usable:
        starts.append(offset)
        offset += _aligned(p.nbytes)
    total = offset
    layout = TurnLayout()
    cursor = 0
    for layer in sorted(weight_bytes):
        first = next((s for p, s in zip(usable, starts) if p.serves_up_to >= layer), None)
        if first is None:
            break
        at = max(cursor, first)
        need = sum(_aligned(weight_bytes[layer][k]) for k in WEIGHT_KINDS)
        if at + need > total:
            break
        places = {}
        for k in WEIGHT_KINDS:
            places[k] = at
            at += _aligned(weight_bytes[layer][k])
        layout.weights[layer] = places
        cursor = at
    if not layout.weights:
        return TurnLayout()
    for p, s in zip(usable, starts):
        if s >= cursor:
            break
        layout.pieces[(p.layer, p.kind)] = s
        layout.size = s + _aligned(p.nbytes)
    return layout


def layer_pieces(layers: int, tokens: int, hidden: int, intermediate: int, qkv_width: int,
                 residual_bytes: int, compute_bytes: int) -> list[Piece]:
    """The activations of a fused decoder layer that may hold other layers' weights, per layer."""
    out = []
    for s in range(layers):
        out += [Piece(s, "gate_up", tokens * 2 * intermediate * compute_bytes),
                Piece(s, "y", tokens * hidden * residual_bytes),
                Piece(s, "qkv", tokens * qkv_width * compute_bytes)]
        if s > 0:  # layer 0's input is the embeddings' output, copied in: not a chained buffer
            out.append(Piece(s, "x_in", tokens * hidden * residual_bytes))
    return out


def layer_weight_bytes(hidden: int, intermediate: int, q_width: int, kv_width: int, compute_bytes: int) -> dict:
    return {"qkv": (q_width + 2 * kv_width) * hidden * compute_bytes, "o": hidden * q_width * compute_bytes,
            "gate_up": 2 * intermediate * hidden * compute_bytes, "down": hidden * intermediate * compute_bytes}


@functools.lru_cache(maxsize=4096)
def kept_across_turn(layers: int, cached_layers: int, tokens: int, hidden: int, intermediate: int,
                     q_width: int, kv_width: int, residual_bytes: int = 4, compute_bytes: int = 2) -> int:
    """How many layers keep their weights across the turn, with the bf16 copies in the top
    `cached_layers` layers (apply._cache_weights) and the others NF4 (cached: the planner asks for
    every plan it prices)."""
    pieces = layer_pieces(layers, tokens, hidden, intermediate, q_width + 2 * kv_width, residual_bytes, compute_bytes)
    weights = layer_weight_bytes(hidden, intermediate, q_width, kv_width, compute_bytes)
    return len(plan_layout(pieces, {layer: weights for layer in range(layers - cached_layers)}).weights)
