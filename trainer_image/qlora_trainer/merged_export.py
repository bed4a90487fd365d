"""The optional merged export: the adapter folded into a bf16 copy of the base, as safetensors.

For serving stacks that do not load adapters. The base is reloaded unquantized (merging into
4-bit weights would round the adapter away), so this needs the base's bf16 size in memory.
"""

import gc
import logging
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

log = logging.getLogger(__name__)


def export_merged(base_dir: Path, adapter_dir: Path, dest: Path, tokenizer, trust_remote_code: bool = False) -> Path:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    base = AutoModelForCausalLM.from_pretrained(
        str(base_dir), dtype=torch.bfloat16, device_map={"": 0} if torch.cuda.is_available() else "cpu",
        trust_remote_code=trust_remote_code,
    )
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(str(dest), safe_serialization=True)
    tokenizer.save_pretrained(str(dest))
    log.info("merged model saved (%.1f MB)", sum(p.stat().st_size for p in dest.rglob("*") if p.is_file()) / 1e6)
    del base, merged
    gc.collect()
    return dest
