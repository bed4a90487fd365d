"""The checks vLLM makes when it loads a LoRA adapter from a folder, restated for our tests.

vLLM (vllm/lora: its PEFT config helper and LoRA model loader) reads adapter_config.json and
refuses modules_to_save and DoRA, needs bias "none" unless started with LoRA bias enabled, and a
rank no larger than --max-lora-rank. It then reads adapter_model.safetensors, where every tensor
must be named base_model.model.<module>.lora_A.weight / .lora_B.weight (or the embedding
variants), and the last part of each module name must be a module the model supports LoRA on;
lora_A is [rank, in_features] and lora_B [out_features, rank] of the base layer it adapts. The
vLLM package itself does not install on this CPU-only machine, so these rules are what we test.
"""

import json
from pathlib import Path

PREFIX = "base_model.model."
# vLLM's LoRA-capable modules of Llama-family models (it packs q/k/v and gate/up itself).
LLAMA_LORA_MODULES = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                      "embed_tokens", "lm_head"}


def base_shapes(base_dir: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    shapes = {}
    for file in base_dir.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a dict
                shapes[key] = tuple(f.get_slice(key).get_shape())
    return shapes


def vllm_load_problems(adapter_dir: Path, base_dir: Path, max_lora_rank: int = 64) -> list[str]:
    """Why vLLM would refuse to load this adapter on this base; empty when it would load it."""
    from safetensors import safe_open

    problems = []
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    for field in ("r", "lora_alpha", "target_modules"):
        if field not in config:
            problems.append(f"adapter_config.json lacks {field}")
    if config.get("modules_to_save"):
        problems.append("modules_to_save is set (vLLM supports only None)")
    if config.get("use_dora"):
        problems.append("DoRA adapters are not supported")
    if config.get("bias", "none") != "none":
        problems.append("a LoRA bias needs vLLM's LoRA bias switch")
    rank = config.get("r", 0)
    if rank > max_lora_rank:
        problems.append(f"rank {rank} over --max-lora-rank {max_lora_rank}")
    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        return [*problems, "no adapter_model.safetensors"]
    shapes = base_shapes(base_dir)
    seen: dict[str, set[str]] = {}
    with safe_open(str(weights), framework="pt") as f:
        for name in f.keys():  # noqa: SIM118
            shape = tuple(f.get_slice(name).get_shape())
            if not name.startswith(PREFIX) or not name.endswith((".lora_A.weight", ".lora_B.weight")):
                problems.append(f"{name}: not a LoRA weight name vLLM parses")
                continue
            module, side = name[len(PREFIX):].rsplit(".", 2)[0], name.rsplit(".", 2)[1]
            if module.rsplit(".", 1)[-1] not in LLAMA_LORA_MODULES:
                problems.append(f"{module}: not a module vLLM applies LoRA to")
            base = shapes.get(f"{module}.weight")
            if base is None:
                problems.append(f"{module}: no such layer in the base model")
                continue
            out_features, in_features = base
            expected = (rank, in_features) if side == "lora_A" else (out_features, rank)
            if shape != expected:
                problems.append(f"{name}: shape {shape}, vLLM expects {expected}")
            seen.setdefault(module, set()).add(side)
    problems += [f"{m}: only {sorted(s)}" for m, s in seen.items() if s != {"lora_A", "lora_B"}]
    if not seen:
        problems.append("no LoRA tensors")
    return problems
