"""What the spec asks of the model, checked against the model's config before any weights load.

A target module the model lacks, or a maxSeqLength beyond its context, would otherwise surface
minutes later (after gigabytes are downloaded and quantized) as a library error that the operator
cannot tell from a transient one. Both are permanent (exit INVALID_CONFIG), with a reason of their
own and a message that lists what the model does have.

The module names come from the architecture built on the meta device: no memory, no weights, the
exact names peft will match against.
"""

import logging
from pathlib import Path

from qlora_api.spec import QLoRAJobSpec

from qlora_trainer.errors import invalid_config, model_not_found

log = logging.getLogger(__name__)

ALL_LINEAR = "all-linear"
# Where configs keep their context length, in the order transformers' own models use them.
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")
_NAMES_SHOWN = 40


def check_spec_against_model(model_dir: Path, spec: QLoRAJobSpec) -> None:
    """Raise a permanent TrainerFailure if the spec asks for what this model cannot do."""
    config = load_config(model_dir, spec.model.trust_remote_code, spec.model.uri)
    check_context_length(config, spec.training.max_seq_length, spec.model.uri)
    if list(spec.lora.target_modules) != [ALL_LINEAR]:
        layers = adaptable_layers(config, spec.model.trust_remote_code)
        if layers is not None:
            check_target_modules(spec.lora.target_modules, layers, spec.model.uri)


def load_config(model_dir: Path, trust_remote_code: bool, uri: str):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        # An unknown model_type or a damaged config.json: from_pretrained would fail the same way.
        raise model_not_found(
            f"{uri}: config.json cannot be read as a transformers model config ({str(exc)[:300]}); point "
            "spec.model.uri at a model folder with a config.json this trainer's transformers supports",
            "UnsupportedModel",
        ) from exc


def context_length(config) -> int | None:
    """The longest sequence the model's positions cover, counting RoPE scaling, or None if unknown."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    base = next((getattr(text, k) for k in _CONTEXT_KEYS if isinstance(getattr(text, k, None), int)), None)
    if base is None:
        return None
    scaling = getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None) or {}
    factor = scaling.get("factor") if isinstance(scaling, dict) else None
    if isinstance(factor, int | float) and factor > 1:
        original = scaling.get("original_max_position_embeddings")
        # With an original length the config's own length is already the scaled one (Llama 3.1);
        # without, the factor stretches the config's length (yarn added to a Qwen2.5 config).
        return max(base, int(original * factor)) if isinstance(original, int) else int(base * factor)
    return base


def check_context_length(config, max_seq_length: int, uri: str) -> None:
    context = context_length(config)
    if context is not None and max_seq_length > context:
        raise invalid_config(
            f"spec.training.maxSeqLength {max_seq_length} is longer than the context of {uri} ({context} tokens, "
            f"from its config.json): create the QLoRAJob with maxSeqLength {context} or less",
            "MaxSeqLengthExceedsContext",
        )


def adaptable_layers(config, trust_remote_code: bool) -> dict[str, str] | None:
    """Full module name -> class name of every layer LoRA can wrap, from the architecture built on
    the meta device. None if it cannot be built here (peft then has the last word)."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except Exception as exc:  # an architecture that only builds with its weights or a GPU: not our call
        log.warning("could not build %s on the meta device to check target modules (%s); peft will check them",
                    type(config).__name__, exc)
        return None
    return {name: type(module).__name__ for name, module in model.named_modules()
            if name and _adaptable(module)}


def _adaptable(module) -> bool:
    """The layer types peft's LoRA wraps (bitsandbytes' 4-bit Linear replaces nn.Linear in place)."""
    import torch.nn as nn
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, nn.Linear | nn.Embedding | nn.Conv1d | nn.Conv2d | nn.Conv3d | Conv1D |
                      nn.MultiheadAttention)


def check_target_modules(targets: list[str], layers: dict[str, str], uri: str) -> None:
    """Every name must match at least one adaptable layer as peft matches a list of names: the full
    module name, or its tail after a dot. (peft itself only refuses when none of them match, and
    silently skips a misspelt one beside a correct one.)"""
    missing = [t for t in targets if not any(name == t or name.endswith("." + t) for name in layers)]
    if not missing:
        return
    short = sorted({name.rsplit(".", 1)[-1] for name in layers})
    shown = ", ".join(short[:_NAMES_SHOWN]) + (f" (and {len(short) - _NAMES_SHOWN} more)" if len(short) > _NAMES_SHOWN else "")
    raise invalid_config(
        f"spec.lora.targetModules names {', '.join(repr(t) for t in missing)}, which {uri} does not have as a "
        f"layer LoRA can adapt; its layers are: {shown}. Create the QLoRAJob with names from that list, or "
        f"with targetModules [{ALL_LINEAR}]",
        "UnknownTargetModule",
    )
