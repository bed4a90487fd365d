"""The tokenize phase as the CLI meets it (its process's first large pass) against the floor as the
CLI benchmark takes it (in the driver's warm process) and as a fresh process's first pass, on the
CPU, with the 8B row's texts (the fixture tokenizer under the Llama-3-8B config, 80 train texts
and 4 eval texts of 1024 tokens, made as trainer_cli_speed.py makes them).

Each measurement runs in a process of its own (transformers imported, the tokenizer loaded,
nothing tokenized yet), `--repeats` times; the table gives medians:
- phase, first pass: data.build_examples over train and eval, as the CLI's tokenize phase;
- floor, first pass: trainer_cli_speed.tokenize_floor (a fresh tokenizer, one batched call);
- floor and phase in a warm process: after three passes, as the benchmark's driver takes the floor.

    python benchmarks/tokenize_first_pass.py --repeats 6
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for folder in ("operator", "trainer_image", "tests", "benchmarks"):
    sys.path.insert(0, str(REPO / folder))


def prepare(folder: Path) -> None:
    """The 8B row's tokenizer folder (no weights) and its texts."""
    import trainer_cli_speed as bench
    from trainer_fixtures.tiny_model import build_tokenizer
    from transformers import AutoConfig, AutoTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(folder)
    AutoConfig.for_model(**dict(bench.shapes()["llama-3-8b"], dtype="bfloat16", bos_token_id=tok.bos_token_id,
                                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)).save_pretrained(folder)
    loaded = AutoTokenizer.from_pretrained(str(folder))
    row = bench.ROWS["8b-1024"]
    train = bench.texts_for(row, 20, seed=0, tokenizer=loaded)
    held_out = bench.texts_for(row, 1, seed=1, tokenizer=loaded)[:48]
    (folder / "texts.json").write_text(json.dumps({"train": train, "eval": held_out}))


def measure(folder: Path, mode: str) -> dict:
    import logging

    import trainer_cli_speed as bench
    from qlora_api.spec import TrainingSpec
    from qlora_trainer import data
    from transformers import AutoTokenizer

    logging.disable(logging.INFO)
    texts = json.loads((folder / "texts.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    spec = TrainingSpec(maxSeqLength=1024, batchSize=4)
    records = {split: [data.Record(f"{split}.jsonl line {i}", "text", {"text": t}) for i, t in enumerate(texts[split])]
               for split in ("train", "eval")}

    def phase():
        began = time.perf_counter()
        for split in ("train", "eval"):
            data.build_examples(records[split], tokenizer, spec, split)
        return time.perf_counter() - began

    def floor():
        return bench.tokenize_floor(folder, texts["train"] + texts["eval"])["seconds"]

    if mode == "phase":
        return {"phase, first pass": phase()}
    if mode == "floor":
        return {"floor, first pass": floor()}
    for _ in range(3):
        phase()
    return {"floor, warm process": floor(), "phase, warm process": phase()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--measure", nargs=2, help=argparse.SUPPRESS)
    opts = ap.parse_args()
    if opts.measure:
        print(json.dumps(measure(Path(opts.measure[0]), opts.measure[1])))
        return 0
    folder = Path(tempfile.mkdtemp(prefix="tokenize-first-pass-")) / "llama-3-8b"
    prepare(folder)
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")  # as the trainer image sets it
    times: dict[str, list[float]] = {}
    try:
        for _ in range(opts.repeats):
            for mode in ("phase", "floor", "warm"):
                out = subprocess.run([sys.executable, __file__, "--measure", str(folder), mode], capture_output=True,
                                     text=True, env=env, check=True).stdout
                for name, seconds in json.loads(out.strip().splitlines()[-1]).items():
                    times.setdefault(name, []).append(seconds)
    finally:
        shutil.rmtree(folder.parent, ignore_errors=True)
    median = {name: statistics.median(xs) for name, xs in times.items()}
    print(f"8B row's texts, {os.cpu_count()} CPUs, medians of {opts.repeats} processes")
    print("| measurement | ms | phase, first pass / it |\n|---|---|---|")
    for name, seconds in median.items():
        print(f"| {name} | {seconds * 1e3:.1f} | {median['phase, first pass'] / seconds:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
