"""CUDA graphs of the fused decoder layers: the host launches a layer's forward or backward as one
graph replay instead of ~130 kernels and ~250 Python-level calls (measured at ~10.6 ms per layer
per micro-step on an H100 host, more than the GPU's own time on small micro-steps).

When the same token count comes back (fixed-length rows: every row one record), the layers that do
not recompute are captured once with torch.cuda.make_graphed_callables (forward and backward,
sharing one memory pool) and replayed from then on. Anything else runs eagerly: other shapes,
packed records whose boundaries change from batch to batch, recomputed layers, CPU.

What makes the layers capturable: no host syncs; dropout seeds drawn on the device inside the
forward (torch's graph-safe generator: every replay draws new masks); LoRA factors rebuilt inside
the graph from the live parameters (LoRASet.factors skips its cache while capturing); the record
boundaries a static device tensor. QLORA_CUDA_GRAPHS=0 turns it off.
"""

from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger(__name__)


class _LayerCore(torch.nn.Module):
    """One fused decoder layer as make_graphed_callables wants it: tensors in, tensor out, the
    layer's LoRA factors as its only parameters (the same Parameter objects, not copies)."""

    def __init__(self, layer, pack, run):
        super().__init__()
        params = [*layer._qlora_qkv_lora.params(), *layer._qlora_o_lora.params(),
                  *layer._qlora_gate_up_lora.params(), *layer._qlora_down_lora.params()]
        self.lora = torch.nn.ParameterList(params)
        object.__setattr__(self, "_layer", layer)  # not a submodule: its frozen weights stay out
        self._pack, self._run = pack, run

    def forward(self, x, cos, sin):
        return self._run(self._layer, x, cos, sin, self._pack)


class LayerGraphs:
    """The graphs of one model's fused layers, for one input shape."""

    def __init__(self, layers, run):
        self.layers = layers  # every fused decoder layer, in order
        self.run = run  # run(layer, x, cos, sin, pack) -> y: the eager fused layer
        self.key = None
        self.cores: dict = {}
        self.failed = os.environ.get("QLORA_CUDA_GRAPHS", "1") == "0"
        self.rope = None
        self.first = None

    def _eligible(self):
        return [layer for layer in self.layers if not getattr(layer, "gradient_checkpointing", False)]

    def _capture(self, x, cos, sin, pack) -> None:
        layers = self._eligible()
        if not layers:
            raise RuntimeError("every layer recomputes")
        n, h = x.shape
        self.rope = (cos.detach().clone(), sin.detach().clone())
        samples = []
        for i in range(len(layers)):
            xs = (torch.randn(n, h, device=x.device) * 0.02).to(x.dtype)
            samples.append((xs.requires_grad_(x.requires_grad if i == 0 else True), *self.rope))
        cores = tuple(_LayerCore(layer, pack, self.run) for layer in layers)
        with torch.autocast(device_type="cuda", enabled=False):  # the fused functions cast explicitly
            torch.cuda.make_graphed_callables(cores, tuple(samples))
        self.cores = {id(layer): core for layer, core in zip(layers, cores)}
        self.first = layers[0]
        self.params = [p for core in cores for p in core.parameters()]
        self.grads = [torch.zeros_like(p) for p in self.params]

    def _give_grads(self) -> None:
        """A graph's backward hands out its own static buffers as the LoRA gradients; a parameter
        whose .grad is None would take that buffer as its .grad (autograd keeps an unshared
        incoming gradient), and the next replay, with gradient accumulation, would overwrite it.
        So every graphed parameter enters backward with a .grad of its own, zeroed."""
        missing = [i for i, p in enumerate(self.params) if p.grad is None]
        if missing:
            torch._foreach_zero_([self.grads[i] for i in missing])
            for i in missing:
                self.params[i].grad = self.grads[i]

    def __call__(self, layer, x, cos, sin, pack):
        """The layer's output through its graph, or None (run it eagerly)."""
        if self.failed or not x.is_cuda:
            return None
        key = (tuple(x.shape), x.dtype, pack[0].data_ptr(), pack[1], tuple(cos.shape), cos.dtype)
        if self.key is None:
            if layer is not (self._eligible() or [None])[0]:
                return None
            try:
                self._capture(x, cos, sin, pack)
            except Exception as exc:  # noqa: BLE001  (eager stays correct; say why once)
                log.warning("CUDA graphs off for this model, the fused layers run eagerly: %s", exc)
                self.failed = True
                return None
            self.key = key
            log.info("captured CUDA graphs of %d decoder layers for %d tokens", len(self.cores), x.shape[0])
        if key != self.key or id(layer) not in self.cores:
            return None
        if layer is self.first:
            self.rope[0].copy_(cos)
            self.rope[1].copy_(sin)
            self._give_grads()
        return self.cores[id(layer)](x, *self.rope)
