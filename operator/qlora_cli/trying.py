"""`qlora try NAME --prompt ...` and `qlora eval NAME --file data.jsonl`: the adapter on this machine,
always beside the base model it was trained on, so the difference is what the adapter did."""

import shutil
import textwrap
from pathlib import Path

import click

from qlora_cli.local_model import load
from qlora_cli.main import kube_options, session
from qlora_cli.s3 import S3Options, s3_options


def local_options(command):
    command = click.option("--base", help="A local folder (or hub id) with the base model, instead of the job's.")(command)
    command = click.option("--adapter", type=click.Path(exists=True, file_okay=False, path_type=Path),
                           help="An adapter folder already fetched (default: fetch and verify it).")(command)
    command = click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:1, ...")(command)
    command = click.option("--quantize/--no-quantize", default=True, show_default=True,
                           help="Load the base in 4 bits as the trainer did (else in the compute dtype).")(command)
    return s3_options(command)


def generate(loaded, prompt: str, max_new_tokens: int, chat: bool) -> tuple[str, str]:
    """(base reply, adapted reply), greedy, for the same prompt."""
    import torch

    tok = loaded.tokenizer
    if chat and tok.chat_template:
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
    else:
        text = prompt
    inputs = tok(text, return_tensors="pt", add_special_tokens=not (chat and tok.chat_template)).to(loaded.device)
    settings = {"max_new_tokens": max_new_tokens, "do_sample": False, "pad_token_id": tok.pad_token_id}

    def reply() -> str:
        with torch.no_grad():
            out = loaded.model.generate(**inputs, **settings)
        return tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()

    with loaded.model.disable_adapter():
        base = reply()
    return base, reply()


def side_by_side(left_title: str, left: str, right_title: str, right: str, width: int) -> str:
    column = max(20, (width - 3) // 2)
    lefts = [left_title, "-" * len(left_title)] + (textwrap.wrap(left, column) or ["(empty)"])
    rights = [right_title, "-" * len(right_title)] + (textwrap.wrap(right, column) or ["(empty)"])
    rows = max(len(lefts), len(rights))
    lefts += [""] * (rows - len(lefts))
    rights += [""] * (rows - len(rights))
    return "\n".join(f"{a.ljust(column)} | {b}".rstrip() for a, b in zip(lefts, rights))


@click.command("try")
@click.argument("name")
@click.option("--prompt", "-p", "prompts", multiple=True, required=True, help="A prompt (repeat for more).")
@click.option("--max-new-tokens", type=int, default=64, show_default=True)
@click.option("--raw", is_flag=True, help="Send the prompt as is, without the tokenizer's chat template.")
@local_options
@kube_options
def try_adapter(name, prompts, max_new_tokens, raw, base, adapter, device, quantize, **s3):
    """Reply to each prompt with the base model and with NAME's adapter, side by side."""
    job = session().get_job(name)
    loaded = load(job, S3Options(**s3), base, adapter, device, quantize)
    width = shutil.get_terminal_size((120, 20)).columns
    for prompt in prompts:
        base_reply, adapted_reply = generate(loaded, prompt, max_new_tokens, chat=not raw)
        click.echo(f"prompt: {prompt}")
        click.echo(side_by_side("base", base_reply, f"with {name}", adapted_reply, width))
        click.echo()


def eval_losses(loaded, path: Path, job: dict) -> tuple[float, float, int]:
    """(base loss, adapted loss, rows), computed exactly as the trainer computes its eval loss."""
    from qlora_api.spec import DatasetSource, TrainingSpec
    from qlora_trainer.data import Collator, build_examples, read_file
    from qlora_trainer.evaluation import eval_loss

    dataset = DatasetSource.model_validate(job["spec"]["dataset"])
    training = TrainingSpec.model_validate(job["spec"].get("training") or {})
    records = read_file(path, dataset.format, dataset.record_format, str(path))
    rows = build_examples(records, loaded.tokenizer, training, "eval")
    collator = Collator(loaded.tokenizer.pad_token_id, packed=training.packing)
    with loaded.model.disable_adapter():
        before = eval_loss(loaded.model, rows, collator, training.batch_size, loaded.compute_dtype)
    after = eval_loss(loaded.model, rows, collator, training.batch_size, loaded.compute_dtype)
    return before, after, len(records)


@click.command("eval")
@click.argument("name")
@click.option("--file", "data_file", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="JSONL or Parquet records in one of the job's record formats.")
@local_options
@kube_options
def eval_adapter(name, data_file, base, adapter, device, quantize, **s3):
    """The eval loss of the base model and of NAME's adapter on a file of records."""
    import math

    job = session().get_job(name)
    loaded = load(job, S3Options(**s3), base, adapter, device, quantize)
    before, after, count = eval_losses(loaded, data_file, job)
    click.echo(f"{count} records from {data_file}")
    width = len(f"with {name}")
    click.echo(f"{'base'.ljust(width)}  eval loss {before:.4f}  perplexity {math.exp(min(before, 700)):.2f}")
    click.echo(f"with {name}  eval loss {after:.4f}  perplexity {math.exp(min(after, 700)):.2f}")


COMMANDS = [try_adapter, eval_adapter]
