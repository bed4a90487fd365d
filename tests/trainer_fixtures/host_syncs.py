"""Counting the trainer's host reads of tensor values (each one a GPU->host sync on a GPU) on a CPU.

A `.item()`, `bool(tensor)`, `.tolist()`, `.cpu()` or a boolean-mask index waits for every kernel
queued before it on a GPU, so the host cannot run ahead of the device. On a CPU nothing waits, but
the calls are the same: a TorchFunctionMode sees each one, so a CPU test can hold the training
loop to "reads only at logging, checkpoint and end of training" (benchmarks/NOTES.md, session 7).

`train_in_process` runs build_trainer + train on the tiny fixture model in this process (fp32, no
quantization: seconds) and returns the logged losses, the tokens counted and the reads seen.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

READS = {"item", "__bool__", "__float__", "__int__", "__index__", "tolist", "cpu", "numpy", "nonzero"}


class HostReads(TorchFunctionMode):
    """Records the name of every tensor read that needs the value on the host: in `seen` those of
    the training loop around the model, in `in_model` those inside `model`'s forward (transformers'
    mask checks on a CPU; the fast path's own, which the benchmark loop shares, on a GPU)."""

    def __init__(self, model=None):
        super().__init__()
        self.seen: list[str] = []
        self.in_model: list[str] = []
        self._depth = 0
        self._hooks = [] if model is None else [
            model.register_forward_pre_hook(lambda *_: self._enter(1)),
            model.register_forward_hook(lambda *_: self._enter(-1)),
        ]

    def _enter(self, step: int) -> None:
        self._depth += step

    def __exit__(self, *exc):
        for hook in self._hooks:
            hook.remove()
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name == "__getitem__" and len(args) > 1 and isinstance(args[1], torch.Tensor) \
                and args[1].dtype == torch.bool:
            name = "bool-mask index"
        if name in READS or name == "bool-mask index":
            (self.in_model if self._depth else self.seen).append(name)
        return func(*args, **kwargs)


@dataclass
class InProcessRun:
    losses: list[float]
    tokens: int
    steps: int
    reads: list[str] = field(default_factory=list)
    reads_in_model: list[str] = field(default_factory=list)
    trainer: object = None
    fast_loss_calls: int = 0


def train_in_process(model_dir: Path, workdir: Path, *, max_steps: int, logging_steps: int, packing: bool = True,
                     batch_size: int = 4, accumulation: int = 2, max_grad_norm: float = 0.3,
                     records: int = 160, fast_loss: bool = False) -> InProcessRun:
    """`fast_loss`: install the fast path's fused cross-entropy (acceleration/apply.py) as a GPU plan
    would, and count the training forwards that reach it."""
    from peft import get_peft_model
    from qlora_api.spec import LoRASpec, TrainingSpec
    from qlora_trainer import data, model_loading, training_loop
    from qlora_trainer.reporting import ProgressReporter
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

    from trainer_fixtures.tiny_model import chat_records

    spec = TrainingSpec(maxSteps=max_steps, loggingSteps=logging_steps, batchSize=batch_size,
                        gradientAccumulationSteps=accumulation, maxSeqLength=64, packing=packing,
                        maxGradNorm=max_grad_norm, warmupSteps=1, learningRate=2e-3, checkpointSteps=0)
    # torch's fused AdamW, as the memory plan picks on a GPU: the for-loop one reads each step count
    # with .item() (a CPU tensor there, so no sync; but it would drown the count)
    spec = spec.model_copy(update={"optimizer": "adamw_torch_fused"})
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    rows = data.build_examples([data.Record(f"line {i}", "messages", r)
                                for i, r in enumerate(chat_records(records, seed=1))], tokenizer, spec, "train")
    set_seed(spec.seed)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.config.use_cache = False
    model = get_peft_model(model, model_loading.lora_config(LoRASpec()))
    calls = []
    if fast_loss:
        from types import MethodType, SimpleNamespace

        from qlora_trainer.acceleration import apply

        lm = model.get_base_model()
        assert apply._patch_causal_lm_loss(lm, SimpleNamespace(ce_chunk_tokens=4096))
        fused = lm.forward

        def counted(self, *args, **kwargs):
            calls.append(kwargs.get("num_items_in_batch"))
            return fused(*args, **kwargs)

        lm.forward = MethodType(counted, lm)
    with open("/dev/null", "w") as sink:
        trainer = training_loop.build_trainer(model, tokenizer, rows, [], spec, workdir, torch.float32,
                                              ProgressReporter(sink), None, training_loop.Interruption())
        with HostReads(model) as reads:
            outcome = training_loop.train(trainer, None, training_loop.Interruption())
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return InProcessRun(losses, outcome.tokens, outcome.steps, reads.seen, reads.in_model, trainer,
                        sum(1 for c in calls if c is not None))
