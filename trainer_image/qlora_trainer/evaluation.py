"""Eval loss and perplexity on the held-out split: the mean NLL over every label token.

Token-weighted (not a mean of per-batch means as Trainer.evaluate reports), so the number does not
depend on how rows were batched, and before/after compare like for like.
"""

import math
from contextlib import nullcontext

import torch

from qlora_trainer.data import IGNORE, Collator, Example


@torch.no_grad()
def eval_loss(model, rows: list[Example], collator: Collator, batch_size: int, compute_dtype=None) -> float | None:
    if not rows:
        return None
    was_training = model.training
    model.eval()
    device = next(p.device for p in model.parameters())
    autocast = (
        torch.autocast(device.type, dtype=compute_dtype)
        if compute_dtype in (torch.bfloat16, torch.float16) else nullcontext()
    )
    total_nll, total_tokens = 0.0, 0
    try:
        for start in range(0, len(rows), batch_size):
            batch = collator([vars(r) for r in rows[start:start + batch_size]])
            labels = batch.pop("labels").to(device)
            with autocast:
                logits = model(**{k: v.to(device) for k, v in batch.items()}, use_cache=False).logits
            # Shift so that each position predicts the next token, as the training loss does; one
            # row at a time in float32, since a whole batch of fp32 logits of a 150k vocabulary is GBs.
            for row_logits, row_labels in zip(logits, labels):
                targets = row_labels[1:]
                total_nll += torch.nn.functional.cross_entropy(
                    row_logits[:-1].float(), targets, ignore_index=IGNORE, reduction="sum"
                ).item()
                total_tokens += int((targets != IGNORE).sum())
    finally:
        model.train(was_training)
    return total_nll / max(total_tokens, 1)


def perplexity(loss: float | None) -> float | None:
    if loss is None:
        return None
    return math.exp(min(loss, 700.0))  # exp overflows a float past ~709
