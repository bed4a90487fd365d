"""Causal LMs that do not take the fused decoder layer still train, through the general path.

The fused decoder layer covers Llama-style layers (Llama, Qwen2, Mistral and the like: RMSNorm,
SiLU-gated MLP, plain rotary attention). Every other Hugging Face causal LM goes through the same
API: NF4 via bitsandbytes, LoRA via peft on all linear layers, the trainer's memory plan, and
apply_acceleration's per-projection LoRA functions and chunked loss where they apply. Here, tiny
models of four other families, built in the test (no download), fp32 compute on the CPU: the fast
path gives the plain peft model's loss and LoRA gradients, and a few optimizer steps lower the loss.
"""

import pytest
import torch

FAMILIES = {
    # family: (config class, its sizes); all small enough for a second of CPU each
    "gpt_neox": ("GPTNeoXConfig", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, vocab_size=128, max_position_embeddings=64)),
    "opt": ("OPTConfig", dict(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                              vocab_size=128, max_position_embeddings=64, word_embed_proj_dim=64,
                              dropout=0.0)),  # its own dropout (0.1 by default) would make the runs differ
    "phi": ("PhiConfig", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              vocab_size=128, max_position_embeddings=64)),
    "gemma": ("GemmaConfig", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=128,
                                  max_position_embeddings=64)),
}


def _spec():
    from qlora_api import QLoRAJobSpec

    return QLoRAJobSpec.model_validate({
        "model": {"uri": "s3://models/tiny/"}, "dataset": {"uri": "s3://data/train.jsonl"},
        "output": {"bucket": "adapters"},
        "quantization": {"computeDtype": "float32"},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "training": {"batchSize": 2, "gradientAccumulationSteps": 1, "maxSeqLength": 16},
    })


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_non_llama_family_trains_through_the_general_path(tmp_path, monkeypatch, family):
    import transformers
    from qlora_trainer.acceleration import apply_acceleration, trainer_hooks
    from qlora_trainer.model_loading import ModelFiles, add_adapter, load_quantized_model

    torch.manual_seed(0)
    config_class, sizes = FAMILIES[family]
    config = getattr(transformers, config_class)(**sizes, tie_word_embeddings=False)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    spec = _spec()
    monkeypatch.setenv("QLORA_ACCELERATION", "cpu")  # the fast path's wiring on torch references
    plan = trainer_hooks.plan_before_loading(tmp_path, spec)
    model = load_quantized_model(ModelFiles(tmp_path, "test"), spec.model, spec.quantization, spec.training)
    model = add_adapter(model, spec.lora)  # all-linear, as a QLoRAJob asks by default
    import bitsandbytes as bnb

    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()) >= 8  # NF4 base really
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.2)  # B = 0 would leave the A side untested
    model.train()
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])

    plain_loss, plain_grads = loss_and_grads()
    # every family is sized by the planner (OPT's MLP width is ffn_dim) and planned per projection
    assert plan is not None and not plan.fused_layers, plan
    report = apply_acceleration(model, plan)
    assert report.lora_layers >= 8 and report.fused_layers == 0, report.describe()
    fast_loss, fast_grads = loss_and_grads()
    torch.testing.assert_close(fast_loss, plain_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast_grads, plain_grads, rtol=1e-4, atol=1e-6)

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(6):
        loss, _ = loss_and_grads()
        optimizer.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0] - 0.1, losses


def test_the_fast_paths_attention_takes_autocasts_dtype_as_sdpa_does():
    """Under CUDA autocast a LayerNorm runs in fp32, so a GPT-NeoX layer's projections (which return
    their input's dtype, as bitsandbytes' do) hand the attention fp32 q, k and v, and the flash
    kernels take only fp16 and bf16: the fast path's attention casts them to autocast's dtype, as
    SDPA does under autocast (found on an H200 with a Pythia-6.9B-shaped model, where every step
    failed; the CPU's autocast stands in for the GPU's here). Outside autocast they go in as given."""
    import types

    import torch.nn.functional as F
    from qlora_trainer.acceleration import packing

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 8, 16) for _ in range(3))
    module = types.SimpleNamespace()  # an attention module the fast path gave no compute dtype
    seen = []  # what the kernel gets (on a GPU the flash kernel, which autocast does not cover)
    kernel = packing._per_record_sdpa
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(packing, "_per_record_sdpa", lambda *a: seen.append([t.dtype for t in a[:3]]) or kernel(*a))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, _ = packing.varlen_attention_forward(module, q, k, v, None)
        plain, _ = packing.varlen_attention_forward(module, q, k, v, None)
    assert seen == [[torch.bfloat16] * 3, [torch.float32] * 3]
    assert out.dtype == torch.bfloat16
    expected = F.scaled_dot_product_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), is_causal=True)
    torch.testing.assert_close(out, expected.transpose(1, 2), rtol=2e-2, atol=2e-2)
    assert plain.dtype == torch.float32
    torch.testing.assert_close(plain, F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2))
