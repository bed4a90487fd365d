"""Weights kept across the turn (acceleration/turn_weights.py): where the layout puts each layer's
weights, checked against a replay of the order in which the graphed layers write and read the
arena over several micro-steps, and what the planner and the benchmark shapes get from it."""

from __future__ import annotations

import numpy as np
import pytest
from qlora_trainer.acceleration import turn_weights as tw

# (layers, tokens a micro-step, hidden, intermediate, q width, kv width, bf16 copies): the
# benchmark's 8B and 7B rows as the auto plan runs them (micro-batch 2 x 1,024 tokens)
LLAMA_8B = (32, 2048, 4096, 14336, 4096, 1024, 8)
QWEN_7B = (28, 2048, 3584, 18944, 3584, 512, 10)


def _layout(layers, tokens, hidden, inter, q, kv, cached):
    pieces = tw.layer_pieces(layers, tokens, hidden, inter, q + 2 * kv, 4, 2)
    weights = tw.layer_weight_bytes(hidden, inter, q, kv, 2)
    return tw.plan_layout(pieces, {k: weights for k in range(layers - cached)}), pieces, weights


class _Arena:
    """The arena as 512-byte cells, each holding the label of what was last written there."""

    def __init__(self, layout, pieces, weights):
        self.cells = np.full(-(-layout.size // tw.ALIGN), -1, dtype=np.int64)
        self.labels: dict = {}
        self.where = {}
        for p in pieces:
            if (p.layer, p.kind) in layout.pieces:
                self.where[(p.kind, p.layer)] = (layout.pieces[(p.layer, p.kind)], p.nbytes)
        for layer, places in layout.weights.items():
            for kind, at in places.items():
                self.where[("W_" + kind, layer)] = (at, weights[kind])

    def _cells(self, name):
        at, nbytes = self.where[name]
        assert at % tw.ALIGN == 0 and at + nbytes <= self.cells.size * tw.ALIGN
        return slice(at // tw.ALIGN, -(-(at + nbytes) // tw.ALIGN))

    def write(self, name, what):
        if name in self.where:
            self.cells[self._cells(name)] = self.labels.setdefault(what, len(self.labels))

    def read(self, name, what):
        if name in self.where:
            got = self.cells[self._cells(name)]
            assert (got == self.labels.get(what, -2)).all(), f"{name} does not hold {what}"


def _replay(layout, pieces, weights, layers: int, micro_steps: int = 4) -> int:
    """The graphed layers' reads and writes of the arena, in program order (cuda_graphs.py,
    fused_layer.py): a read must find what the write it depends on left there. Returns how many
    forwards found their weights kept."""
    arena = _Arena(layout, pieces, weights)
    flag = dict.fromkeys(layout.weights, False)
    reused = 0
    for m in range(micro_steps):
        for s in range(layers):  # forward: q|k|v, o_proj (y), gate|up, down_proj (the next layer's input)
            kept = s in layout.weights
            if kept and flag[s]:
                reused += 1
            elif kept:
                for kind in tw.WEIGHT_KINDS:
                    arena.write(("W_" + kind, s), ("W", s))
            if s > 0:
                arena.read(("x_in", s), ("x_in", s, m))
            for kind, out in (("qkv", "qkv"), ("o", "y"), ("gate_up", "gate_up"), ("down", "x_in")):
                # each product reads its weight while it writes its output: written first, the read
                # finds the weight only if the two do not overlap
                if out == "x_in":
                    if s + 1 < layers:
                        arena.write(("x_in", s + 1), ("x_in", s + 1, m))
                else:
                    arena.write((out, s), (out, s, m))
                if kept:
                    arena.read(("W_" + kind, s), ("W", s))
            if kept:
                flag[s] = False
        for s in reversed(range(layers)):  # backward: the MLP block, then attention
            kept = s in layout.weights
            if kept:
                arena.write(("W_down", s), ("W", s))
            arena.read(("y", s), ("y", s, m))
            arena.read(("gate_up", s), ("gate_up", s, m))
            arena.write(("gate_up", s), ("grad", s, m))  # SwiGLU's gradient, over what it read
            if kept:
                arena.write(("W_gate_up", s), ("W", s))
                arena.write(("W_o", s), ("W", s))
            arena.read(("qkv", s), ("qkv", s, m))
            if s > 0:
                arena.read(("x_in", s), ("x_in", s, m))
            if kept:
                arena.write(("W_qkv", s), ("W", s))
                for kind in tw.WEIGHT_KINDS:
                    arena.read(("W_" + kind, s), ("W", s))
                flag[s] = True
    return reused


@pytest.mark.parametrize("shape,kept", [(LLAMA_8B, 14), (QWEN_7B, 13)])
def test_the_benchmark_shapes_keep_their_lower_layers_weights_across_the_turn(shape, kept):
    layout, pieces, weights = _layout(*shape)
    assert layout.kept == list(range(kept))
    layers, *_, cached = shape
    assert tw.kept_across_turn(*shape[:1], cached, *shape[1:6]) == kept
    # every forward but the first micro-step's finds its weights: one dequantization a kept layer
    # and micro-step saved (of the uncached layers' two)
    assert _replay(layout, pieces, weights, layers, micro_steps=4) == kept * 3
    # nothing extra: the arena is activations the layers kept anyway
    in_arena = sum(tw._aligned(p.nbytes) for p in pieces if (p.layer, p.kind) in layout.pieces)
    assert layout.size == in_arena


def test_regions_lie_only_over_activations_dead_from_the_layers_backward_to_its_next_forward():
    layout, pieces, _ = _layout(*LLAMA_8B)
    spans = {(p.layer, p.kind): (layout.pieces[(p.layer, p.kind)], p) for p in pieces if (p.layer, p.kind) in layout.pieces}
    for layer, places in layout.weights.items():
        start, end = min(places.values()), max(places.values())
        end += tw.layer_weight_bytes(4096, 14336, 4096, 1024, 2)[max(places, key=places.get)]
        under = [p for at, p in spans.values() if at < end and at + p.nbytes > start]
        assert under and all(p.layer > layer for p in under)
        assert all(p.layer >= layer + 2 for p in under if p.kind == "x_in")


def test_a_layout_that_lays_a_layers_weights_over_its_own_activations_fails_the_replay(monkeypatch):
    """The replay is the check: with gate|up allowed to hold its own layer's weights, the forward's
    gate|up product writes over the weight it multiplies."""
    monkeypatch.setattr(tw, "ACTIVATION_KINDS", (("gate_up", 0), ("y", 1), ("qkv", 1), ("x_in", 2)))
    layout, pieces, weights = _layout(*LLAMA_8B)
    with pytest.raises(AssertionError, match="does not hold"):
        _replay(layout, pieces, weights, 32)


def test_too_few_activations_keep_nothing_and_need_no_arena():
    # one 512-token micro-step of a wide model: the layers above cannot hold one layer's weights
    layout, *_ = _layout(4, 512, 4096, 14336, 4096, 1024, 0)
    assert layout.kept == [] and layout.size == 0 and layout.pieces == {}
    assert tw.kept_across_turn(4, 0, 512, 4096, 14336, 4096, 1024) == 0


def test_the_planner_prices_the_forwards_that_find_their_weights(monkeypatch):
    """Graphed, nothing recomputed: 14 of the 8B row's 48 dequantizations a micro-step (24 uncached
    layers, forward and backward) are not made; with a recompute, none is saved."""
    from qlora_trainer.acceleration import planner

    shape = planner.ModelShape(layers=32, hidden=4096, intermediate=14336, heads=32, kv_heads=8, head_dim=128,
                               vocab=128256)
    job = planner.JobShape(seq_len=1024, micro_batch=4, grad_accum=1)
    gpu = planner.GpuSpec(memory_bytes=139 * planner.GIB, bandwidth=4.3e12)
    per_layer = shape.linear_params_per_layer * planner._DEQUANT_BYTES / gpu.bandwidth
    with_turn = planner.step_seconds(shape, job, gpu, 2, 0, 8, graphs=True)
    recomputing = planner.step_seconds(shape, job, gpu, 2, 2, 8, graphs=True)
    monkeypatch.setattr(planner, "kept_across_turn", lambda *a, **k: 0)
    assert planner.step_seconds(shape, job, gpu, 2, 0, 8, graphs=True) == pytest.approx(
        with_turn + 2 * 14 * per_layer, rel=1e-12)
    assert planner.step_seconds(shape, job, gpu, 2, 2, 8, graphs=True) == pytest.approx(recomputing, rel=1e-12)


def _train_nf4(folder, monkeypatch, turn: str):
    """Two optimizer steps of two micro-steps of a 4-layer NF4 model through the emulated graph
    programs, turn weights on ("1") or off ("0"): losses, gradients, NF4 dequantizations per
    micro-step, and the model's graphs."""
    import dataclasses

    import bitsandbytes.functional as bnbf
    import torch
    from qlora_trainer.acceleration import apply_acceleration
    from support.memory_plans import fixed_plan
    from support.nf4_model import tiny_nf4_peft_model

    monkeypatch.setenv("QLORA_CUDA_GRAPHS", "emulate")
    monkeypatch.setenv("QLORA_TURN_WEIGHTS", turn)
    model = tiny_nf4_peft_model(folder / turn, layers=4, dropout=0.1)
    apply_acceleration(model, dataclasses.replace(fixed_plan(), cached_layers=1))
    model.train()
    calls = [0]
    real = bnbf.dequantize_4bit

    def counted(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(bnbf, "dequantize_4bit", counted)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2, foreach=False)
    torch.manual_seed(7)
    batches = [torch.randint(0, 96, (2, 48)) for _ in range(4)]
    losses, grads, dequantized = [], [], []
    for step in (batches[:2], batches[2:]):
        optimizer.zero_grad(set_to_none=True)
        for ids in step:
            before = calls[0]
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            dequantized.append(calls[0] - before)
            losses.append(loss.detach())
        grads.append(torch.cat([p.grad.flatten() for p in params]))
        optimizer.step()
    monkeypatch.setattr(bnbf, "dequantize_4bit", real)
    return losses, grads, dequantized, model


def test_weights_kept_across_the_turn_train_bit_for_bit_as_dequantized_ones(tmp_path, monkeypatch):
    """On a real NF4 model (CPU, the graph programs emulated): the same losses and gradients, bit for
    bit, over two optimizer steps with dropout, whether the lower layers' forwards dequantize or
    find what their backward left; each of those forwards but the first skips its layer's seven
    dequantizations; the top layer holds the bf16 copy."""
    import torch

    on = _train_nf4(tmp_path, monkeypatch, "1")
    off = _train_nf4(tmp_path, monkeypatch, "0")
    layers = on[3].get_base_model().model.layers
    graphs = layers[0]._qlora_graphs
    assert graphs.turn is not None and graphs.turn.kept == [0, 1, 2]
    assert off[3].get_base_model().model.layers[0]._qlora_graphs.turn is None
    assert layers[3]._qlora_qkv.cache is not None and layers[0]._qlora_qkv.cache is None
    kept = len(graphs.turn.kept)
    per_pass = 3 * 7  # three uncached layers, seven NF4 weights each
    assert off[2] == [2 * per_pass] * 4
    assert on[2] == [2 * per_pass] + [2 * per_pass - 7 * kept] * 3
    for got, want in zip(on[0] + on[1], off[0] + off[1]):
        assert torch.equal(got, want)
    # the arena holds the layers' own activations: layer 1's gate|up is saved there
    assert layers[1]._qlora_gate_up.turn.untyped_storage().data_ptr() == graphs.arena.untyped_storage().data_ptr()
    st = graphs.states[id(layers[1])]
    assert st.into["gate_up"].untyped_storage().data_ptr() == graphs.arena.untyped_storage().data_ptr()


def test_a_copy_of_a_model_with_kept_weights_places_its_own(tmp_path, monkeypatch):
    """A deep copy (an EMA, a reference model) taken after the graphs were built holds no region of
    the original's arena: its own graphs lay out their own on its first step."""
    import copy

    import torch

    model = _train_nf4(tmp_path, monkeypatch, "1")[3]
    twin = copy.deepcopy(model)
    originals = model.get_base_model().model.layers
    twins = twin.get_base_model().model.layers
    assert all(w.turn is None and w.turn_flag is None for layer in twins
               for w in (layer._qlora_qkv, layer._qlora_o, layer._qlora_gate_up, layer._qlora_down))
    ids = torch.randint(0, 96, (2, 48), generator=torch.Generator().manual_seed(9))
    twin(input_ids=ids, labels=ids).loss.backward()
    mine, theirs = twins[0]._qlora_graphs, originals[0]._qlora_graphs
    assert mine is not theirs and mine.turn is not None and mine.turn.kept == [0, 1, 2]
    assert twins[0]._qlora_qkv.turn.untyped_storage().data_ptr() == mine.arena.untyped_storage().data_ptr()
    assert mine.arena.untyped_storage().data_ptr() != theirs.arena.untyped_storage().data_ptr()


def test_the_plan_says_how_many_layers_keep_their_weights_across_the_turn():
    """What the trainer logs and publishes (training_config.json's memoryPlan): the 8B row's auto
    plan keeps 14 layers' weights across the turn; packed rows (eager layers) and a lean plan (every
    layer recomputed) none, and say nothing of it."""
    from qlora_trainer.acceleration import planner

    shape = planner.ModelShape(layers=32, hidden=4096, intermediate=14336, heads=32, kv_heads=8, head_dim=128,
                               vocab=128256)
    job = planner.JobShape(seq_len=1024, micro_batch=4, grad_accum=1)
    gpu = planner.GpuSpec(memory_bytes=139 * planner.GIB, bandwidth=4.3e12)
    fixed = planner.plan_memory(shape, job, gpu, packing=False)
    assert (fixed.recompute_layers, fixed.cached_layers, fixed.turn_layers) == (0, 8, 14)
    assert "bf16 weight copies in 8 layers, weights kept across the turn in 14 layers," in fixed.describe()
    for plan in (planner.plan_memory(shape, job, gpu, packing=True), planner.plan_memory(shape, job, gpu, "lean",
                                                                                          packing=False)):
        assert plan.turn_layers == 0 and "across the turn" not in plan.describe()
