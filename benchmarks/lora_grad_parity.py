"""Does the fast path train the same model as the plain recipe at the 7B and 8B shapes? One table.

Issue 19 part 1: on the speed benchmark's Llama-3-8B row the fast path ended 13 steps at 10.70
where the plain recipe and Unsloth ended at 10.54. This script measures, on one GPU:

1. Step-1 LoRA gradients against an fp32 reference of the same model and batch. The model is the
   benchmark's (random weights of the real shape, N(0, 0.02) matrices, unit norms, NF4 with
   double quantization); the reference is the same NF4 weights dequantized into an fp32 model
   with the same adapter, run in fp32 (no TF32). For every LoRA tensor: cosine and relative error
   of the plain recipe (bf16 autocast), the fused decoder layer and the per-projection path,
   pooled per module kind and per layer. Two adapter states: as initialised (B = 0, so only the B
   gradients are non-zero: the issue's step 1) and with B drawn small (the A side and the LoRA
   forward then count too). Dropout 0, so no mask differs.
2. Over --steps optimizer steps at the 8B shape (the benchmark's row: 4 x 1024 tokens, its four
   batches cycled, lr 2e-4, clip 0.3, LoRA dropout 0.05): the plain recipe with two seeds (its
   own seed-to-seed spread), the fast path (fused; per projection) with the first seed, and the
   plain and fused runs again with dropout 0 (what the masks account for).

    python3 benchmarks/lora_grad_parity.py --out $OUT                 # on the GPU machine
    python3 benchmarks/lora_grad_parity.py --only grads --layers 8    # fewer layers, part 1 only
    python benchmarks/lora_grad_parity.py --cpu                       # rehearsal here: tiny shape, fp32

The spread measured here is what speed_vs_unsloth.py's table uses to flag a row whose last loss
departs from the plain recipe's (PLAIN_SEED_SPREAD there).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import re
import statistics
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
import speed_vs_unsloth as bench  # noqa: E402  (the benchmark's shapes, loaders, batches and loop)

sys.path.insert(0, str(bench.REPO / "trainer_image"))
KINDS = bench.TARGETS
TINY = dict(model_type="llama", architectures=["LlamaForCausalLM"], num_hidden_layers=2, hidden_size=64,
            intermediate_size=160, num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
            tie_word_embeddings=False, max_position_embeddings=512, rope_theta=500000.0, rms_norm_eps=1e-5,
            hidden_act="silu")


# -- the model ------------------------------------------------------------------------------------


def write_checkpoint(shape: str, layers: int | None, device: str) -> Path:
    """Random weights of the shape, drawn like the benchmark's (matrices N(0, 0.02), vectors 1),
    on the GPU (seconds, where the CPU takes minutes for 8B) and saved as bf16 safetensors."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(TINY if shape == "tiny" else bench.SHAPES[shape])
    if layers:
        cfg["num_hidden_layers"] = layers
    folder = bench.SHM / f"parity-{shape}-{cfg['num_hidden_layers']}"
    if (folder / ".done").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    config = AutoConfig.for_model(**cfg, dtype="bfloat16")
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config)
    g = torch.Generator(device=device).manual_seed(0)
    tensors = {}
    for key, p in meta.state_dict().items():
        if config.tie_word_embeddings and key == "lm_head.weight":
            continue
        if p.dim() == 1:
            tensors[key] = torch.ones(p.shape, dtype=torch.bfloat16)
        else:
            t = torch.empty(p.shape, dtype=torch.float32, device=device).normal_(0.0, 0.02, generator=g)
            tensors[key] = t.to(torch.bfloat16).cpu()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(folder)
    (folder / ".done").write_text("ok")
    return folder


def load_plain(folder: Path, device: str):
    """The benchmark's plain recipe (NF4 + double quantization, prepare_model_for_kbit_training,
    peft LoRA r16/alpha32 on every projection, dropout 0.05)."""
    return bench.load_model("plain", folder, 1024, 0.05, device=device)


def set_dropout(model, p: float) -> None:
    from torch import nn

    for name, m in model.named_modules():
        if isinstance(m, nn.Dropout) and ".lora_dropout." in name + ".":
            m.p = p


def lora_params(model) -> dict:
    return {n: p for n, p in model.named_parameters() if p.requires_grad and ".lora_" in n}


def reset_adapter(model, seed: int, b_std: float = 0.0) -> None:
    """LoRA as peft initialises it (A Kaiming-uniform, B zero), from `seed`, in module order; B
    drawn N(0, b_std) instead when b_std > 0. In place, so the fast path's caches see it."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(lora_params(model).items()):
            if ".lora_A." in name:
                bound = 1.0 / math.sqrt(p.shape[1])  # kaiming_uniform_(a=sqrt(5)) on [r, in]
                p.copy_(torch.rand(p.shape, generator=g).mul_(2 * bound).sub_(bound))
            else:
                p.copy_(torch.randn(p.shape, generator=g).mul_(b_std) if b_std else torch.zeros(p.shape))
            p.grad = None


def fp32_reference(plain, device: str):
    """The same model in fp32: the NF4 weights dequantized (as both bf16 paths compute with them),
    every other tensor copied, the same adapter."""
    import bitsandbytes as bnb
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = plain.get_base_model()
    config = copy.deepcopy(base.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device(device):
        ref = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    ref.config.use_cache = False
    own = dict(ref.named_parameters())
    with torch.no_grad():
        for name, m in base.named_modules():
            if isinstance(m, bnb.nn.Linear4bit):
                w = bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state)
                own[name.replace(".base_layer", "") + ".weight"].copy_(w.float())
        for name, p in base.named_parameters():
            key = name.replace(".base_layer", "")
            if ".lora_" in name or p.__class__.__name__ == "Params4bit" or key not in own:
                continue
            own[key].copy_(p.float())
    lc = next(iter(plain.peft_config.values()))
    ref = get_peft_model(ref, LoraConfig(r=lc.r, lora_alpha=lc.lora_alpha, lora_dropout=0.0, bias="none",
                                         target_modules=KINDS, task_type="CAUSAL_LM"))
    return ref


def copy_adapter(src, dst) -> None:
    import torch

    theirs = lora_params(src)
    with torch.no_grad():
        for name, p in lora_params(dst).items():
            p.copy_(theirs[name])


def fast_copy(plain, row: str, fused: bool, graphs: bool, device: str, fp32_residual: bool = True):
    """The fast path as the trainer builds it: the benchmark row's plan (bf16 weight copies off:
    they hold the same values and the GPU holds several models here), installed on a copy;
    fp32_residual False: the residual stream in bf16, as before the fix (diagnosis)."""
    from qlora_trainer.acceleration import apply_acceleration

    shape, seq, batch = bench.ROWS[row]
    folder = Path(plain.get_base_model().config._name_or_path)
    if device == "cuda":
        plan = bench.plan_job({}, folder, seq, batch, 1, 0.05)
        plan = dataclasses.replace(plan, cached_layers=0, fused_layers=fused, fp32_residual=fp32_residual)
    else:
        from qlora_trainer.acceleration import MemoryPlan

        plan = MemoryPlan(micro_batch=2, grad_accum=2, recompute="none", recompute_layers=0, cached_layers=0,
                          ce_chunk_tokens=256, packing=False, predicted_peak_bytes=0, predicted_tokens_per_s=0.0,
                          budget_bytes=0, policy="rehearsal", fused_layers=fused, fp32_residual=fp32_residual)
    fast = copy.deepcopy(plain)
    before = os.environ.get("QLORA_CUDA_GRAPHS")
    os.environ["QLORA_CUDA_GRAPHS"] = "1" if graphs else "0"
    try:
        report = apply_acceleration(fast, plan)
    finally:
        os.environ.pop("QLORA_CUDA_GRAPHS") if before is None else os.environ.update(QLORA_CUDA_GRAPHS=before)
    return fast, plan, report


# -- part 1: gradients ----------------------------------------------------------------------------


def batches_for(vocab: int, micro: int, seq: int, rows: int):
    return bench._fixed_batches(vocab, micro, seq, rows // micro)(0)


def gradients(model, batches, autocast: bool, device: str) -> tuple[dict, float]:
    import torch

    model.train()
    model.zero_grad(set_to_none=True)
    n_items = sum(int((b["labels"][..., 1:] != -100).sum()) for b, _ in batches)
    total = 0.0
    for kwargs, _ in batches:
        kwargs = {k: v.to(device) for k, v in kwargs.items()}
        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if autocast and device == "cuda" else \
            torch.autocast("cpu", enabled=False)
        with ctx:
            loss = model(**kwargs, num_items_in_batch=n_items).loss
        loss.backward()
        total += float(loss.detach())
    grads = {n: p.grad.detach().float().clone() for n, p in lora_params(model).items()}
    model.zero_grad(set_to_none=True)
    return grads, total


_NAME = re.compile(r"layers\.(\d+)\..*\.(\w+_proj)\.lora_([AB])\.")


def compare(grads: dict, ref: dict) -> dict:
    """Per (kind, A|B) and per layer: cosine, relative error and sign gain, pooled over the tensors."""
    import torch

    acc: dict = {}
    for name, r in ref.items():
        m = _NAME.search(name)
        layer, kind, side = int(m.group(1)), m.group(2), m.group(3)
        g = grads[name].to(r.device).double()
        r = r.double()
        # Adam's first steps move every element by about lr * sign(g): what they gain is
        # sum(g_ref * sign(g)) / sum(|g_ref|) (1 = every sign right), whatever the magnitudes.
        stats = (float((g * r).sum()), float((g * g).sum()), float((r * r).sum()), float(((g - r) ** 2).sum()),
                 float((r * torch.sign(g)).sum()), float(r.abs().sum()))
        for key in ((kind, side), ("layer", layer, side), ("all", side)):
            acc[key] = [a + b for a, b in zip(acc.get(key, (0.0,) * 6), stats)]
    out = {}
    for key, (gr, gg, rr, dd, rs, ra) in acc.items():
        out[key] = (gr / math.sqrt(max(gg * rr, 1e-300)), math.sqrt(dd / max(rr, 1e-300)), rs / max(ra, 1e-300))
    return out


def grads_part(shape: str, layers: int | None, device: str, results: dict) -> list[str]:
    import torch

    row = {"qwen2.5-7b": "7b-1024", "llama-3-8b": "8b-1024"}.get(shape, "8b-1024")
    _, seq, rows = bench.ROWS[row]
    if device == "cpu":
        seq, rows = 64, 4
    t0 = time.perf_counter()
    folder = write_checkpoint(shape, layers, device)
    t_write = time.perf_counter() - t0
    plain = load_plain(folder, device)
    set_dropout(plain, 0.0)
    vocab = plain.config.vocab_size
    n_layers = plain.config.num_hidden_layers
    print(f"[grads] {shape} ({n_layers} layers): checkpoint {t_write:.0f} s, loaded {time.perf_counter() - t0:.0f} s",
          flush=True)
    paths = {"plain": plain}
    for name, fused, fp32_residual in (("fused", True, True), ("fused, bf16 residual", True, False),
                                       ("per-projection", False, True)):
        paths[name], plan, report = fast_copy(plain, row, fused, graphs=False, device=device,
                                              fp32_residual=fp32_residual)
        print(f"[grads] {name}: plan {plan.describe()}; {report.describe()}", flush=True)
    from qlora_trainer.acceleration.apply import _recast_frozen_floats

    paths["plain, bf16 residual"] = copy.deepcopy(plain)  # what the fast path does to the residual stream
    _recast_frozen_floats(paths["plain, bf16 residual"], torch.bfloat16 if device == "cuda" else torch.float32)
    ref = fp32_reference(plain, device)
    if device == "cuda":
        torch.cuda.empty_cache()
    plan_micro = plan.micro_batch
    table = []
    for state, b_std in (("step 1 (B = 0)", 0.0), ("B ~ N(0, 0.005)", 0.005)):
        for m in (*paths.values(), ref):
            reset_adapter(m, 0, b_std)
        ref_grads, ref_loss = gradients(ref, batches_for(vocab, 1, seq, rows), False, device)
        found = {"loss fp32": ref_loss}
        cmp = {}
        for name, m in paths.items():
            micro = rows if name.startswith("plain") else plan_micro
            g, loss = gradients(m, batches_for(vocab, micro, seq, rows), True, device)
            found[f"loss {name}"] = loss
            cmp[name] = compare(g, ref_grads)
            del g
        results.setdefault(shape, {})[state] = {
            "losses": found, "layers": n_layers,
            "compare": {name: {"/".join(map(str, k)): v for k, v in c.items()} for name, c in cmp.items()}}
        sides = ("B",) if b_std == 0 else ("A", "B")
        table.append(f"\n{shape} ({n_layers} of {bench.SHAPES[shape]['num_hidden_layers'] if shape in bench.SHAPES else n_layers}"
                     f" layers), {rows} x {seq} tokens, {state}; loss fp32 {ref_loss:.4f}, " +
                     ", ".join(f"{k[5:]} {v:.4f}" for k, v in found.items() if k != "loss fp32"))
        table.append("| module | " + " | ".join(f"{n} cos | {n} rel err | {n} sign gain" for n in paths) + " |")
        table.append("|---|" + "---|" * (3 * len(paths)))
        for key in [(k, s) for s in sides for k in KINDS] + [("all", s) for s in sides]:
            cells = [f"{cmp[n][key][0]:.6f} | {cmp[n][key][1]:.2e} | {cmp[n][key][2]:.4f}" for n in paths]
            table.append(f"| {key[0]} {key[1]} | " + " | ".join(cells) + " |")
        table.append("| layer (B, all kinds) | " + " | ".join(f"{n} cos | {n} rel err" for n in paths) + " |")
        table.append("|---|" + "---|" * (2 * len(paths)))
        for layer in range(n_layers):
            cells = [f"{cmp[n][('layer', layer, 'B')][0]:.6f} | {cmp[n][('layer', layer, 'B')][1]:.2e}" for n in paths]
            table.append(f"| {layer} | " + " | ".join(cells) + " |")
        print("\n".join(table[-(len(KINDS) * len(sides) + n_layers + 8):]), flush=True)
    del ref, paths
    if device == "cuda":
        torch.cuda.empty_cache()
    return table, plain


# -- part 2: training -----------------------------------------------------------------------------


def train(model, plan_micro: int, seq: int, rows: int, steps: int, seed: int, device: str, optimizer_plan) -> list:
    import torch

    reset_adapter(model, seed)
    torch.manual_seed(seed)  # the dropout masks: torch's RNG (plain) or seeds drawn from it (fused)
    vocab = model.config.vocab_size
    params, opt = bench.make_optimizer(model, device=device, plan=optimizer_plan)
    times, losses, tokens = bench.train_steps(model, params, opt,
                                              bench._fixed_batches(vocab, plan_micro, seq, rows // plan_micro),
                                              steps, device=device)
    del opt
    # Tokens/s of the steps after the first three (compilation, graph capture), median.
    SPEED[id(losses)] = statistics.median(n / t for n, t in zip(tokens[3:], times[3:])) if len(times) > 4 else None
    return losses


SPEED: dict = {}  # id(losses) -> tokens/s of that run


TRAIN_RUNS = [("plain, seed 0", "plain", 0, 0.05), ("plain, seed 1", "plain", 1, 0.05),
              ("fused, seed 0", "fused", 0, 0.05), ("fused, bf16 residual, seed 0", "fused-bf16", 0, 0.05),
              ("fused, seed 1", "fused", 1, 0.05), ("per-projection, seed 0", "per-projection", 0, 0.05),
              ("plain, seed 0, dropout 0", "plain", 0, 0.0), ("fused, seed 0, dropout 0", "fused", 0, 0.0),
              ("plain, seed 0, fused AdamW", "plain-fusedadam", 0, 0.05)]
# Where the departure comes from (all dropout 0, so no mask differs): the fast path keeps the
# residual stream in bf16 (it casts peft's fp32 embeddings and norms back), the plain recipe in fp32.
DIAGNOSE_RUNS = [("plain, seed 0, dropout 0", "plain", 0, 0.0), ("fused, seed 0, dropout 0", "fused", 0, 0.0),
                 ("plain, bf16 residual, dropout 0", "plain-bf16", 0, 0.0),
                 ("per-projection, dropout 0", "per-projection", 0, 0.0),
                 ("fused, bf16 residual, dropout 0", "fused-bf16", 0, 0.0)]


def training_part(plain, steps: int, device: str, deadline: float, results: dict, todo=TRAIN_RUNS) -> list[str]:
    import torch

    _, seq, rows = bench.ROWS["8b-1024"]
    if device == "cpu":
        seq, rows = 64, 4
    runs: dict = {}
    speeds: dict = {}
    for label, engine, seed, p in todo:
        if time.monotonic() > deadline:
            runs[label] = None
            print(f"[train] {label}: skipped (time)", flush=True)
            continue
        t0 = time.perf_counter()
        set_dropout(plain, p)
        try:
            if engine == "plain-bf16":
                from qlora_trainer.acceleration.apply import _recast_frozen_floats

                model = copy.deepcopy(plain)
                _recast_frozen_floats(model, torch.bfloat16 if device == "cuda" else torch.float32)
                runs[label] = train(model, rows, seq, rows, steps, seed, device, None)
                del model
            elif engine.startswith("plain"):
                opt_plan = None
                if engine == "plain-fusedadam":
                    opt_plan = type("P", (), {"optimizer": "adamw_torch_fused"})()
                runs[label] = train(plain, rows, seq, rows, steps, seed, device, opt_plan)
            else:
                fast, plan, _ = fast_copy(plain, "8b-1024", engine.startswith("fused"), graphs=True, device=device,
                                          fp32_residual=not engine.endswith("-bf16"))
                runs[label] = train(fast, plan.micro_batch, seq, rows, steps, seed, device, plan)
                del fast
        except Exception as exc:  # a diagnosis variant the fast path refuses: say so, go on
            runs[label] = None
            print(f"[train] {label}: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
            continue
            if device == "cuda":
                torch.cuda.empty_cache()
        r = runs[label]
        speeds[label] = SPEED.get(id(r))
        print(f"[train] {label}: {r[0]:.4f} -> {r[12]:.4f} (step 12) -> {r[-1]:.4f} in "
              f"{time.perf_counter() - t0:.0f} s, {speeds[label] or 0:,.0f} tok/s", flush=True)
        results["training"] = runs
        results["training_tokens_per_s"] = speeds
    return training_table(runs, steps, speeds)


def spread_stats(a: list, b: list, upto: int) -> dict:
    d = [abs(x - y) for x, y in zip(a[:upto], b[:upto])]
    tail = d[max(0, upto - 5):upto]
    return {"mean": statistics.mean(d), "max": max(d), "last": d[-1], "max_last5": max(tail)}


def training_table(runs: dict, steps: int, speeds: dict | None = None) -> list[str]:
    speeds = speeds or {}
    base, other = runs.get("plain, seed 0"), runs.get("plain, seed 1")
    lines = [f"\nthe 8B row's shape (tiny in the CPU rehearsal), 4 x 1024 tokens, {steps} steps (the benchmark's row extended; its four batches "
             "cycled); difference from `plain, seed 0`",
             "| run | step 0 | step 12 | last | mean abs diff | max abs diff | abs diff at step 12 | abs diff at last "
             "| tok/s (median, steps 3+) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for label, r in runs.items():
        if r is None:
            lines.append(f"| {label} | not run (time or error: see the log) | | | | | | | |")
            continue
        ref = runs.get("plain, seed 0, dropout 0") if "dropout 0" in label and label != "plain, seed 0, dropout 0" \
            else base
        if ref is None or r is ref:
            lines.append(f"| {label} | {r[0]:.4f} | {r[12]:.4f} | {r[-1]:.4f} | - | - | - | - | {_tps(speeds.get(label))} |")
            continue
        d = [abs(x - y) for x, y in zip(r, ref)]
        lines.append(f"| {label} | {r[0]:.4f} | {r[12]:.4f} | {r[-1]:.4f} | {statistics.mean(d):.4f} | {max(d):.4f} "
                     f"| {d[12]:.4f} | {d[-1]:.4f} | {_tps(speeds.get(label))} |")
    if base and other:
        s13, sall = spread_stats(base, other, 13), spread_stats(base, other, len(base))
        lines.append("\nwithin plain's seed-to-seed spread (mean and max abs diff over all steps no larger than "
                     "plain seed 0 against seed 1):")
        for label, r in runs.items():
            if r is None or r is base or label == "plain, seed 1" or "dropout 0" in label:
                continue
            d = spread_stats(r, other if "seed 1" in label else base, len(base))  # same seed, same batches and RNG use
            within = d["mean"] <= sall["mean"] and d["max"] <= sall["max"]
            lines.append(f"- {label}: mean {d['mean']:.4f} (spread {sall['mean']:.4f}), max {d['max']:.4f} "
                         f"(spread {sall['max']:.4f}): {'WITHIN' if within else 'DEPARTS'}")
        lines.append(f"\nplain's seed-to-seed spread: over 13 steps mean {s13['mean']:.4f}, max {s13['max']:.4f}, "
                     f"max of steps 8-12 {s13['max_last5']:.4f}; over {len(base)} steps mean {sall['mean']:.4f}, "
                     f"max {sall['max']:.4f}, at the last step {sall['last']:.4f}")
        lines.append("(the fused run with dropout 0 is compared with plain with dropout 0)")
    return lines


def _tps(value) -> str:
    return f"{value:,.0f}" if value else "-"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="rehearsal on this CPU: tiny Llama shape, fp32")
    ap.add_argument("--only", choices=("grads", "train", "diagnose"), help="one part only (diagnose: short runs "
                    "at dropout 0 that tell the residual stream's precision from the fused layer)")
    ap.add_argument("--shapes", default="llama-3-8b,qwen2.5-7b")
    ap.add_argument("--layers", type=int, help="fewer decoder layers than the real shape")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--runs", type=int, help="only the first N training runs (TRAIN_RUNS is in order of need)")
    ap.add_argument("--budget-s", type=float, default=540.0)
    ap.add_argument("--out", help="folder for table.md and results.json (default $OUT)")
    args = ap.parse_args()
    t0 = time.monotonic()
    site = "" if args.cpu else bench.prepare_site()  # the site is for the GPU machine's Python
    if site:
        sys.path.insert(0, site)
    import torch

    device = "cpu" if args.cpu else "cuda"
    if args.cpu:
        torch.set_num_threads(2)
        shapes = ["tiny"]
    else:
        torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference in real fp32
        torch.backends.cudnn.allow_tf32 = False
        shapes = args.shapes.split(",")
    out = Path(args.out or os.environ.get("OUT") or bench.REPO / "out")
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"env": {"torch": torch.__version__, "device": torch.cuda.get_device_name(0) if not args.cpu else "cpu"}}
    tables: list[str] = []

    def save():
        (out / "results.json").write_text(json.dumps(results, indent=1))
        (out / "table.md").write_text("\n".join(tables) + "\n")

    plain8 = None
    for shape in shapes:
        if args.only in ("train", "diagnose"):
            break
        if time.monotonic() - t0 > args.budget_s - 120:
            tables.append(f"\n{shape}: gradients skipped (time)")
            continue
        lines, plain = grads_part(shape, args.layers, device, results)
        tables += lines
        save()
        if shape in ("llama-3-8b", "tiny") and args.only is None:
            plain8 = plain
            tables += training_part(plain8, args.steps if not args.cpu else 14, device, t0 + args.budget_s - 60,
                                    results, TRAIN_RUNS[:args.runs])
            save()
        del plain
        if device == "cuda":
            torch.cuda.empty_cache()
    if args.only in ("train", "diagnose"):
        folder = write_checkpoint("tiny" if args.cpu else "llama-3-8b", args.layers, device)
        tables += training_part(load_plain(folder, device), args.steps if not args.cpu else 14, device,
                                t0 + args.budget_s - 30, results,
                                DIAGNOSE_RUNS if args.only == "diagnose" else TRAIN_RUNS[:args.runs])
    save()
    print("\n".join(tables), flush=True)


if __name__ == "__main__":
    main()
