"""CUDA graphs of the fused decoder layers: the host launches a layer's forward or backward as one
graph replay instead of ~130 kernels and ~250 Python-level calls (measured at ~10.6 ms per layer
per micro-step on an H100 host, more than the GPU's own time on small micro-steps).

When the same token count comes back (fixed-length rows: every row one record), every fused layer
that does not use transformers' own checkpointing is captured once, forward and backward as two
graphs sharing one memory pool, and replayed from then on. Anything else runs eagerly: other
shapes, packed records whose boundaries change from batch to batch, offloaded layers, CPU.

The layers are chained through static buffers, so graphing costs almost no memory of its own:
- layer i's forward graph reads its input buffer and writes straight into layer i+1's input
  buffer (its last kernel, the MLP's residual add, writes there: no copy of the residual stream
  per layer, 2 x 32 layers of 32 MB a 2-micro-step 8B step); that buffer is also the checkpoint
  a recomputing layer keeps (with only its seeds and its LoRA A-side products,
  fused_layer.ASides, which stay in the graphs' pool and are rewritten by every forward replay),
  and what a non-recomputing layer's saved activations refer to;
- backward graphs pass the gradient through two buffers shared by all layers (ping-pong), their
  last kernel (the input norm's backward) writing straight into the buffer and, with an fp32
  stream, into its compute-dtype twin, which the next layer's GEMMs read (no cast per block);
- each backward graph adds the layer's LoRA gradients into the parameters' .grad, which are static
  buffers of their own (handed back to the parameters before the first backward of every
  micro-step, so the optimizer's zero_grad(set_to_none=True) is fine).
A recomputing layer's backward graph runs its forward again first; its temporaries are freed
inside the capture, so the next layer's backward reuses that memory.

When no layer recomputes, the lower layers keep their NF4 weights, dequantized by their backward,
for the next micro-step's forward, in an arena that also holds the saved activations of the layers
above them, dead by then (turn_weights.py: 28 of an 8B step's 96 layer dequantizations, at no
memory). QLORA_TURN_WEIGHTS=0 turns that off (diagnosis).

What makes the layers capturable: no host syncs; dropout seeds read from a static buffer (every
fused layer's seeds for a micro-step drawn in one eager kernel before the first layer, the same draw
an eager micro-step makes, and copied in: no RNG inside the graphs, so torch writes no generator
state before each replay); LoRA factors (A concatenated, B block-diagonal and scaled) read from
static buffers, which one more graph rewrites from the live parameters before the first layer's
forward whenever an optimizer step (or an in-place write) may have changed them: once per
optimizer step, not in every replay of every layer (~60 small kernels per layer per micro-step);
the record boundaries a static device tensor.

QLORA_CUDA_GRAPHS=0 turns graphs off; QLORA_CUDA_GRAPHS=emulate runs the very same programs and
buffers eagerly, on any device (how the CPU tests check the chaining and gradient bookkeeping).
"""

from __future__ import annotations

import copy
import logging
import os

import torch

from . import fused_ops as ops
from . import turn_weights
from .fused_layer import (
    _count_optimizer_steps,
    graph_program,
    layer_backward,
    layer_forward,
    layer_lora_params,
    lora_sets,
)

log = logging.getLogger(__name__)


class _Program:
    """One captured step (a CUDA graph), or, emulated, the function itself run on each replay."""

    def __init__(self, fn, graph=None):
        self.fn, self.graph = fn, graph

    def replay(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            self.fn()


class LayerGrads:
    """One graphed layer's LoRA gradients as views of one flat fp32 buffer ([all A gradients | all
    B gradients], each parameter's .grad an ordinary view of it), and their sources, two flat fp32
    buffers: gA written there by lora_a_backward, each set's gB by lora_b_grads. `accumulate` adds
    them in one kernel per layer instead of a cast and a scaling per projection and a multi-tensor
    add per layer (448 + 448 + 64 kernels an 8B step, ~3.2 ms:
    benchmarks/results/speed_small_kernels_8b_session11_h200.md), with the same bits. Only for
    fp32 LoRA factors (anything else keeps LoRASet.grads' list and torch._foreach_add_)."""

    def __init__(self, sets, device):
        params = [p for s in sets for p in s.params()]
        self.rank = sets[0].rank
        n_a = sum(p.numel() for p in params[0::2])
        n_b = sum(p.numel() for p in params[1::2])
        self.acc = torch.zeros(n_a + n_b, dtype=torch.float32, device=device)
        # the sources, gA then gB, in one buffer: the layer's program zeroes it in one fill (clear)
        # before its backward, and the kernels sum into their parts without filling them again
        self.src = torch.zeros(n_a + n_b, dtype=torch.float32, device=device)
        self.src_a, self.src_b = self.src[:n_a], self.src[n_a:]
        self.cleared = False  # between clear() and accumulate(): the sources were zeroed together
        scales, grads, a_at, b_at = [], {}, 0, 0
        for s in sets:
            ps = s.params()
            a_len = sum(p.numel() for p in ps[0::2])
            for a, b, scale in zip(ps[0::2], ps[1::2], s.scales()):
                grads[id(a)] = self.acc[a_at:a_at + a.numel()].view(a.shape)
                grads[id(b)] = self.acc[n_a + b_at:n_a + b_at + b.numel()].view(b.shape)
                scales.append(torch.full((b.shape[0],), scale, dtype=torch.float32))  # rounded as a scalar factor
                a_at += a.numel()
                b_at += b.numel()
            b_len = sum(p.numel() for p in ps[1::2])
            s.sink = (self.src_a[a_at - a_len:a_at].view(s.rank * len(s.modules), ps[0].shape[1]),
                      self.src_b[b_at - b_len:b_at].view(-1, s.rank))
            s.sink_owner = self
        self.row_scale = torch.cat(scales).to(device)
        self.grads = [grads[id(p)] for p in params]

    @staticmethod
    def fits(sets) -> bool:
        params = [p for s in sets for p in s.params()]
        return all(p.dtype == torch.float32 for p in params) and all(
            p.shape[1] == s.rank for s in sets for p in s.params()[1::2])

    def clear(self) -> None:
        """Zero all the sources in one fill before the layer's backward writes them: its LoRA
        kernels then sum into their parts without a fill each (LoRASet.a_grad, b_grads; 8 fills
        a layer's backward fewer). A backward run without it still fills each part itself."""
        self.src.zero_()
        self.cleared = True

    def accumulate(self) -> None:
        ops.lora_grads_accumulate_(self.acc, self.src_a, self.src_b, self.row_scale, self.rank)
        self.cleared = False


class _LayerState:
    """The static buffers and programs of one graphed layer."""

    def __init__(self, layer, index: int, x_in: torch.Tensor, x_out: torch.Tensor):
        self.layer, self.index = layer, index
        self.x_in, self.x_out = x_in, x_out  # x_out is the next graphed layer's x_in when chained
        self.params = layer_lora_params(layer)
        self.seeds = torch.ones(4, dtype=torch.int64, device=x_in.device)
        self.keep = not getattr(layer, "_qlora_recompute", False)
        self.saved = None  # what the forward keeps for backward (ASides: the backward recomputes)
        self.into: dict = {}  # where the forward writes saved q|k|v, y and gate|up (the turn's arena)
        self.turn_flag: torch.Tensor | None = None  # this layer's weights kept across the turn: its flag
        self.forward: _Program | None = None
        self.backward: _Program | None = None
        self.lora_grads: LayerGrads | None = None


class _GraphedLayer(torch.autograd.Function):
    """The autograd face of one graphed layer: its forward and backward are replays. The LoRA
    gradients are added by the backward graph itself, so only the input gets a gradient here;
    `anchor` (one of the layer's LoRA factors) makes the output require grad even when x does not."""

    @staticmethod
    def forward(ctx, x, anchor, graphs, state):
        ctx.graphs, ctx.state = graphs, state
        return graphs.run_forward(state, x)

    @staticmethod
    def backward(ctx, gz):
        return ctx.graphs.run_backward(ctx.state, gz), None, None, None


class LayerGraphs:
    """The graphs of one model's fused layers, for one input shape."""

    def __init__(self, layers, enabled: bool = True):
        self.layers = layers  # every fused decoder layer, in order
        self.enabled = enabled
        mode = os.environ.get("QLORA_CUDA_GRAPHS", "1")  # 0 or emulate: diagnosis and CPU tests
        self.failed = mode == "0" or not enabled
        self.emulate = mode == "emulate"
        self.key = None
        self.states: dict[int, _LayerState] = {}
        self.first = self.last = None  # graphed layers: the first copies the RoPE tables in, the last hands .grad back
        self.rope = self.pack = None
        self.grad_io: list[torch.Tensor] = []
        self.grad_io_c: list = [None, None]  # their compute-dtype twins (an fp32 stream's)
        self.grads: list[torch.Tensor] = []
        self.params: list[torch.Tensor] = []
        self.lora_sets: list = []
        self.refresh: _Program | None = None
        self.factor_key = None
        self.position = {id(layer): i for i, layer in enumerate(layers)}
        self.seed_table: torch.Tensor | None = None  # this micro-step's dropout seeds, [fused layers, 4]
        self.static_seeds: torch.Tensor | None = None  # what the graphed layers read
        self.turn: turn_weights.TurnLayout | None = None  # weights kept across the turn (turn_weights.py)
        self.arena: torch.Tensor | None = None
        self.turn_flags: torch.Tensor | None = None

    def __deepcopy__(self, memo):
        """A copy of the model (an EMA, a reference model, a snapshot for evaluation) gets graphs of
        its own, not yet built: what this object holds (captured graphs, which cannot be copied;
        static buffers the graphs read and write; states keyed by the original layers) belongs to
        the original's layers. The copy builds its own on its first graphed forward."""
        fresh = LayerGraphs.__new__(LayerGraphs)
        memo[id(self)] = fresh  # the copy's layers refer back to it while they are copied
        fresh.__init__(copy.deepcopy(self.layers, memo), enabled=self.enabled)
        return fresh

    def draw_seeds(self, layer, device) -> torch.Tensor:
        """The layer's four dropout seeds for this micro-step. The first fused layer draws every
        layer's in one kernel (the rest take their rows), whether the layers then run graphed or
        eagerly: the graphed forwards used to draw their own inside the graph, so torch wrote the
        graphs' RNG seed and offset with two eager kernels before every forward replay (128 small
        launches and ~1.1 ms of GPU idle an 8B step: benchmarks/results/speed_small_kernels_8b_session11_h200.md).
        A fresh tensor each micro-step: an eager layer's backward keeps its own rows."""
        pos = self.position[id(layer)]
        if pos == 0 or self.seed_table is None:
            self.seed_table = torch.randint(1, 2**30, (len(self.layers), 4), device=device)
        seeds = self.seed_table[pos]
        return seeds if seeds.device == torch.device(device) else seeds.to(device)

    def _eligible(self):
        return [layer for layer in self.layers if not getattr(layer, "gradient_checkpointing", False)]

    # -- capture ---------------------------------------------------------------------------

    def _build(self, x, cos, sin, pack) -> None:
        layers = self._eligible()
        if not layers:
            raise RuntimeError("every layer uses transformers' checkpointing (offloaded)")
        n, h = x.shape
        new = lambda: torch.zeros(n, h, dtype=x.dtype, device=x.device)  # noqa: E731
        self.rope = (cos.detach().clone(), sin.detach().clone())
        self.pack = pack
        self.turn = self._turn_layout(layers, x)
        self.arena = torch.empty(self.turn.size, dtype=torch.uint8, device=x.device) if self.turn else None
        inputs = {}
        for k, layer in enumerate(layers):
            at = self._piece(k, "x_in", x.dtype, (n, h))
            inputs[id(layer)] = new() if at is None else at
        position = self.position
        states = []
        for k, layer in enumerate(layers):
            nxt = self.layers[position[id(layer)] + 1] if position[id(layer)] + 1 < len(self.layers) else None
            out = inputs[id(nxt)] if nxt is not None and id(nxt) in inputs else new()
            states.append(_LayerState(layer, k, inputs[id(layer)], out))
        if self.turn:
            self._place_turn(states, x)
            log.info("layers %d-%d keep their weights across the turn (an arena of %.2f GiB of their activations)",
                     self.turn.kept[0], self.turn.kept[-1], self.turn.size / 2**30)
        self.static_seeds = torch.ones(len(self.layers), 4, dtype=torch.int64, device=x.device)
        for st in states:
            st.seeds = self.static_seeds[position[id(st.layer)]]
        self.grad_io = [new(), new()]
        compute = layers[0]._qlora_o.dtype  # an fp32 stream: each gradient buffer has its compute-dtype twin
        self.grad_io_c = [torch.zeros(n, h, dtype=compute, device=x.device) for _ in range(2)] \
            if x.dtype != compute else [None, None]
        self.params = [p for st in states for p in st.params]
        self.grads = []
        for st in states:
            sets = lora_sets(st.layer)
            if LayerGrads.fits(sets) and [id(p) for s in sets for p in s.params()] == [id(p) for p in st.params]:
                st.lora_grads = LayerGrads(sets, x.device)
                self.grads += st.lora_grads.grads
            else:
                self.grads += [torch.zeros_like(p) for p in st.params]
        self._give_grads()
        self.lora_sets = [s for st in states for s in lora_sets(st.layer)]
        for s in self.lora_sets:
            s.make_static()
        self.refresh = _Program(self._refresh_fn)
        self.factor_key = self._factor_key()
        for st in states:
            st.forward = _Program(self._forward_fn(st))
            st.backward = _Program(self._backward_fn(st))
        if not self.emulate:
            self._capture(states)
        self.states = {id(st.layer): st for st in states}
        self.last = states[-1]
        self.first = states[0]

    def _turn_layout(self, layers, x) -> turn_weights.TurnLayout | None:
        """Which layers keep their weights across the turn, and where (turn_weights.plan_layout):
        only when every fused layer is graphed and none recomputes (a recompute dequantizes
        in its backward anyway, and its forward keeps no activations to lie over)."""
        if os.environ.get("QLORA_TURN_WEIGHTS", "1") == "0" or len(layers) != len(self.layers):
            return None
        if not all(not getattr(layer, "_qlora_recompute", False) for layer in layers):
            return None
        first = layers[0]
        compute = first._qlora_o.dtype
        csize = compute.itemsize
        q, kv = first._qlora_qkv.rows[0], first._qlora_qkv.rows[1]
        hidden, inter = x.shape[1], first._qlora_gate_up.rows[0]
        pieces = turn_weights.layer_pieces(len(layers), x.shape[0], hidden, inter, q + 2 * kv, x.element_size(), csize)
        candidates = {k: turn_weights.layer_weight_bytes(hidden, inter, q, kv, csize) for k, layer in enumerate(layers)
                      if all(w.dequantizes for w in _weights(layer).values())}
        layout = turn_weights.plan_layout(pieces, candidates)
        return layout if layout.weights else None

    def _piece(self, k: int, kind: str, dtype, shape) -> torch.Tensor | None:
        """Layer k's activation `kind` as its place in the arena, or None (where it was)."""
        at = self.turn.pieces.get((k, kind)) if self.turn else None
        if at is None:
            return None
        nbytes = shape[0] * shape[1] * dtype.itemsize
        return self.arena[at:at + nbytes].view(dtype).view(shape)

    def _place_turn(self, states, x) -> None:
        n = x.shape[0]
        self.turn_flags = torch.zeros(len(states), dtype=torch.int32, device=x.device)
        for st in states:
            layer, k = st.layer, st.index
            compute = layer._qlora_o.dtype
            for kind, width, dtype in (("qkv", sum(layer._qlora_qkv.rows), compute), ("y", x.shape[1], x.dtype),
                                       ("gate_up", sum(layer._qlora_gate_up.rows), compute)):
                at = self._piece(k, kind, dtype, (n, width))
                if at is not None:
                    st.into[kind] = at
            if k in self.turn.weights:
                st.turn_flag = self.turn_flags[k:k + 1]
                for kind, w in _weights(layer).items():
                    nbytes = sum(w.rows) * w.in_features * w.dtype.itemsize
                    at = self.turn.weights[k][kind]
                    w.turn = self.arena[at:at + nbytes].view(w.dtype).view(sum(w.rows), w.in_features)
                    w.turn_flag = st.turn_flag

    def _factor_key(self):
        """Changes whenever the LoRA factors may have: an optimizer step anywhere in the process
        (fused AdamW writes without bumping versions), or a parameter's storage or version."""
        return (_count_optimizer_steps(), *((p.data_ptr(), p._version) for p in self.params))

    def _refresh_fn(self):
        for s in self.lora_sets:
            s.refresh_static()

    def _forward_fn(self, st: _LayerState):
        def run():
            with graph_program("forward"):
                z, st.saved = layer_forward(st.layer, st.x_in, *self.rope, self.pack, st.seeds, st.keep,
                                            out=st.x_out, into=st.into)
                if z.data_ptr() != st.x_out.data_ptr():  # written in place: no 32 MB copy per layer (8B)
                    st.x_out.copy_(z)
                if st.turn_flag is not None:  # the layers above will write over the region from here on
                    st.turn_flag.zero_()
        return run

    def _backward_fn(self, st: _LayerState):
        g_in, g_out = self.grad_io[(st.index + 1) % 2], self.grad_io[st.index % 2]
        gc_in, gc_out = self.grad_io_c[(st.index + 1) % 2], self.grad_io_c[st.index % 2]

        def run():
            with graph_program("backward"):
                if st.lora_grads is not None:
                    st.lora_grads.clear()  # the sinks the backward's LoRA kernels sum into
                gx, grads = layer_backward(st.layer, st.x_in, *self.rope, self.pack, st.seeds, st.saved, g_in,
                                           out=g_out, gzc=gc_in, out_c=gc_out)
                if gx.data_ptr() != g_out.data_ptr():
                    g_out.copy_(gx)
                if st.lora_grads is not None:  # grads is empty: the sources are in the sink
                    st.lora_grads.accumulate()
                else:
                    torch._foreach_add_([p.grad for p in st.params], grads)
                if st.turn_flag is not None:  # the region holds the weights until this layer's next forward
                    st.turn_flag.fill_(1)
        return run

    def _capture(self, states) -> None:
        grads_before = [p.grad.clone() for p in self.params]
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm up (Triton compiles, cuBLAS workspaces) off the graph
                for st in states:
                    st.forward.fn()
                for st in reversed(states):
                    st.backward.fn()
            torch.cuda.current_stream().wait_stream(stream)
            pool = torch.cuda.graph_pool_handle()
            for st in states:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    st.forward.fn()
                st.forward.graph = graph
            for st in reversed(states):
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    st.backward.fn()
                st.backward.graph = graph
            graph = torch.cuda.CUDAGraph()  # its own pool: it replays between the layers' graphs
            with torch.cuda.graph(graph):
                self.refresh.fn()
            self.refresh.graph = graph
        finally:  # the warm-up's gradients were not real, whether or not the capture worked
            for p, g in zip(self.params, grads_before):
                p.grad.copy_(g)
            if self.turn_flags is not None:  # the first forward dequantizes
                self.turn_flags.zero_()

    # -- replay ----------------------------------------------------------------------------

    def _give_grads(self) -> None:
        """Every graphed parameter's .grad must be its static buffer when a backward graph runs:
        a parameter without one gets it zeroed; one whose .grad was replaced has it copied in. The
        zeroing is one multi-tensor call: after every zero_grad(set_to_none=True) all of them need it
        (448 buffers at 8B), and one small kernel each left the GPU waiting on their launches, ~3.7 ms
        an 8B step (benchmarks/NOTES.md, "Session 10, where the idle goes")."""
        unset = []
        for p, buf in zip(self.params, self.grads):
            if p.grad is None:
                unset.append(buf)
                p.grad = buf
            elif p.grad is not buf:
                buf.copy_(p.grad)
                p.grad = buf
        if unset:
            torch._foreach_zero_(unset)

    def run_forward(self, st: _LayerState, x: torch.Tensor) -> torch.Tensor:
        if x.data_ptr() != st.x_in.data_ptr():  # chained layers already wrote it
            st.x_in.copy_(x)
        st.forward.replay()
        return st.x_out.detach()  # a fresh alias: autograd may attach its history to it

    def run_backward(self, st: _LayerState, gz: torch.Tensor) -> torch.Tensor:
        if st is self.last:
            self._give_grads()
        g_in, gc_in = self.grad_io[(st.index + 1) % 2], self.grad_io_c[(st.index + 1) % 2]
        if gz.data_ptr() != g_in.data_ptr():  # else the layer above handed it over through the buffer (and its twin)
            g_in.copy_(gz)
            if gc_in is not None:  # the compute-dtype twin the program reads, as _compute casts it
                gc_in.copy_(g_in)
        st.backward.replay()
        return self.grad_io[st.index % 2].detach()

    def __call__(self, layer, x, cos, sin, pack):
        """The layer's output through its graph, or None (run it eagerly)."""
        if self.failed or not (x.is_cuda or self.emulate):
            return None
        key = (tuple(x.shape), x.dtype, pack[0].data_ptr(), pack[1], tuple(cos.shape), cos.dtype)
        if self.key is None:
            if layer is not (self._eligible() or [None])[0]:
                return None
            try:
                with torch.autocast(device_type=x.device.type, enabled=False):  # the fused functions cast explicitly
                    self._build(x, cos, sin, pack)
            except Exception as exc:  # noqa: BLE001  (eager stays correct; say why once)
                log.warning("CUDA graphs off for this model, the fused layers run eagerly: %s", exc)
                self.failed = True
                self.states = {}
                for layer in self.layers:  # the arena goes with the graphs
                    for w in _weights(layer).values():
                        w.turn = w.turn_flag = None
                self.arena = self.turn = self.turn_flags = None
                return None
            self.key = key
            log.info("captured CUDA graphs of %d decoder layers for %d tokens", len(self.states), x.shape[0])
        st = self.states.get(id(layer))
        if key != self.key or st is None:
            return None
        if st is self.first:
            self.rope[0].copy_(cos)
            self.rope[1].copy_(sin)
            self.static_seeds.copy_(self.seed_table)  # drawn by the first fused layer (draw_seeds)
            factors = self._factor_key()
            if factors != self.factor_key:  # an optimizer step (or a write) since the last refresh
                self.refresh.replay()
                self.factor_key = factors
        with torch.autocast(device_type=x.device.type, enabled=False):
            return _GraphedLayer.apply(x, st.params[0], self, st)


def _weights(layer) -> dict:
    """A fused layer's four frozen weights by turn_weights.WEIGHT_KINDS."""
    return {"qkv": layer._qlora_qkv, "o": layer._qlora_o, "gate_up": layer._qlora_gate_up, "down": layer._qlora_down}
