"""Eval loss and perplexity on the held-out split: the mean NLL over every label token.

Token-weighted (not a mean of per-batch means as Trainer.evaluate reports), so the number does not
depend on how rows were batched, and before/after compare like for like.

The loss is taken on a fixed-seed sample of the eval rows of at most `spec.training.evalMaxTokens`
tokens (`eval_sample`): the same rows before, during and after training, so the numbers compare
like for like, and an eval split as large as the training data costs a bounded forward pass.
"""

import math
import random
from contextlib import nullcontext

import torch

from qlora_trainer.data import IGNORE, Collator, Example


def eval_sample(rows: list[Example], max_tokens: int, seed: int) -> list[Example]:
    """Rows drawn in a fixed-seed order until the next would pass max_tokens (0: every row).
    At least one row, so a bound below one row's length still gives a number."""
    if max_tokens <= 0 or sum(len(r.input_ids) for r in rows) <= max_tokens:
        return list(rows)
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    chosen, tokens = [], 0
    for i in order:
        n = len(rows[i].input_ids)
        if chosen and tokens + n > max_tokens:
            continue  # a shorter row further on may still fit
        chosen.append(i)
        tokens += n
    return [rows[i] for i in sorted(chosen)]


@torch.no_grad()
def eval_loss(model, rows: list[Example], collator: Collator, batch_size: int, compute_dtype=None,
              counted: dict | None = None) -> float | None:
    """The mean NLL per label token; `counted`, if given, gets the rows, tokens and label tokens run."""
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
            if counted is not None:
                counted["rows"] = counted.get("rows", 0) + len(labels)
                counted["tokens"] = counted.get("tokens", 0) + sum(
                    len(r.input_ids) for r in rows[start:start + batch_size])
                counted["labelTokens"] = total_tokens
    finally:
        model.train(was_training)
    return total_nll / max(total_tokens, 1)


def perplexity(loss: float | None) -> float | None:
    if loss is None:
        return None
    return math.exp(min(loss, 700.0))  # exp overflows a float past ~709
