"""Where does the fused path's forward leave the plain one? A GPU diagnostic, one table.

Session 3's full benchmark call found the default path's loss off the plain recipe's where a
micro-step holds rows of 2,048 tokens or packed records (Qwen2.5-1.5B shape, step 0, LoRA B still
zero: 12.24 against 12.06 for plain and Unsloth), and the trainer's GPU end-to-end run reported a
training loss that stayed at ~12.0 while its eval loss fell to 4.4. Rows of 512 and 1,024 tokens
agreed to 1e-3, and on the CPU the fused path's torch references agree with the plain model at
the same shapes (8 x 2,048, bf16). So the cause is in what only runs on the GPU: the Triton
kernels, flash attention, bitsandbytes' dequantization into a slice, or the graphs.

This script measures, for several token counts and row lengths:
- the loss of the plain model and of the fused one (graphs off and on), on a 2-layer model of the
  Qwen2.5-1.5B shape with random weights;
- decoder layer 0 alone: the fused forward against the layer's original forward;
- each GPU operation against its torch reference on the CPU at that token count: RMSNorm, RoPE,
  SwiGLU, variable-length flash attention (against SDPA per row), the loss kernel.

    python3 benchmarks/fused_path_parity.py            # on the GPU machine (bf16)
    python3 benchmarks/fused_path_parity.py --cpu      # rehearsal here, tiny shapes, fp32
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "trainer_image"))

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _rel(a, b) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def build(cpu: bool):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    dims = dict(hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2,
                vocab_size=1000) if cpu else \
        dict(hidden_size=1536, intermediate_size=8960, num_attention_heads=12, num_key_value_heads=2,
             vocab_size=151936)
    config = Qwen2Config(num_hidden_layers=2, tie_word_embeddings=True, max_position_embeddings=32768,
                         rope_theta=1e6, rms_norm_eps=1e-6, attn_implementation="sdpa", **dims)
    dtype, device = (torch.float32, "cpu") if cpu else (torch.bfloat16, "cuda")
    model = Qwen2ForCausalLM(config)
    for p in model.parameters():
        if p.dim() == 2:
            p.data.normal_(0, 0.02)
    model = model.to(device, dtype)
    return get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS,
                                            task_type="CAUSAL_LM"))


def accelerated(model, rows: int, graphs: bool):
    from qlora_trainer.acceleration import apply_acceleration
    from qlora_trainer.acceleration.planner import MemoryPlan

    os.environ["QLORA_CUDA_GRAPHS"] = "1" if graphs else "0"
    fast = copy.deepcopy(model)
    apply_acceleration(fast, MemoryPlan(micro_batch=rows, grad_accum=1, recompute="none", recompute_layers=0,
                                        cached_layers=0, ce_chunk_tokens=1024, packing=False,
                                        predicted_peak_bytes=0, predicted_tokens_per_s=0.0, budget_bytes=0,
                                        policy="parity"))
    os.environ.pop("QLORA_CUDA_GRAPHS")
    fast.train()
    return fast


def model_checks(model, rows: int, seq: int) -> dict:
    import torch

    lm = model.get_base_model()
    device = lm.device
    ids = torch.randint(0, min(lm.config.vocab_size, 49152), (rows, seq), device=device)
    items = int(rows * (seq - 1))
    model.train()
    out = {"plain_loss": float(model(input_ids=ids, labels=ids, num_items_in_batch=items).loss)}
    for graphs in (False, True):
        fast = accelerated(model, rows, graphs)
        for _ in range(2 if graphs else 1):  # graphs capture on the first call and replay on the next
            loss = fast(input_ids=ids, labels=ids, num_items_in_batch=items).loss
        out["fused_graphs_loss" if graphs else "fused_loss"] = float(loss)
        if not graphs:  # layer 0 alone, eager: the fused forward against the layer's own
            flm = fast.get_base_model()
            layer = flm.model.layers[0]
            hidden = flm.model.embed_tokens(ids)
            positions = torch.arange(seq, device=device)[None].expand(rows, -1)
            rope = flm.model.rotary_emb(hidden, positions)
            fused = layer(hidden, position_embeddings=rope)
            fused = fused[0] if isinstance(fused, tuple) else fused
            original = layer._qlora_original_layer_forward(hidden, position_embeddings=rope)
            original = original[0] if isinstance(original, tuple) else original
            out["layer0_fused_vs_original"] = _rel(fused, original)
        del fast
    return out


def op_checks(n: int, seq: int, cpu: bool) -> dict:
    """Each GPU operation at n tokens (rows of `seq`) against its torch reference on the CPU."""
    import torch
    import torch.nn.functional as F
    from qlora_trainer.acceleration import fused_ops as ops
    from qlora_trainer.acceleration.fused_layer import _attention, rows_pack
    from qlora_trainer.acceleration.kernels import chunked_cross_entropy

    device, dtype = ("cpu", torch.float32) if cpu else ("cuda", torch.bfloat16)
    hidden, inter, heads, kv, d, vocab = (64, 160, 4, 2, 16, 1000) if cpu else (1536, 8960, 12, 2, 128, 151936)
    g = torch.Generator().manual_seed(1)
    rnd = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(device, dtype)  # noqa: E731
    ref = lambda t: t.detach().float().cpu()  # noqa: E731
    out = {}
    x, w = rnd(n, hidden), rnd(hidden, scale=0.1) + 1
    y, _ = ops.rms_norm(x, w, 1e-6)
    out["rms_norm"] = _rel(y, ops.rms_norm(ref(x), ref(w), 1e-6)[0])
    qkv = rnd(n, heads + 2 * kv, d)
    cos, sin = rnd(n, d), rnd(n, d)
    expected = ref(qkv)
    ops.rope_(qkv[:, :heads + kv], cos, sin)
    ops.rope_(expected[:, :heads + kv], ref(cos), ref(sin))
    out["rope"] = _rel(qkv, expected)
    gu = rnd(n, 2 * inter)
    out["swiglu"] = _rel(ops.swiglu(gu), ops.swiglu(ref(gu)))
    q, k, v = rnd(n, heads, d), rnd(n, kv, d), rnd(n, kv, d)
    cu, max_len = rows_pack(n // seq, seq, device)
    attn, _ = _attention(q, k, v, cu, max_len, d ** -0.5)
    rows = []
    for r in range(n // seq):
        part = [t[r * seq:(r + 1) * seq].transpose(0, 1)[None].float() for t in (q, k, v)]
        rows.append(F.scaled_dot_product_attention(*part, is_causal=True, enable_gqa=True)[0].transpose(0, 1))
    out["flash_varlen_vs_sdpa"] = _rel(attn, torch.cat(rows))
    h, head = rnd(n, hidden), rnd(vocab, hidden, scale=0.05)
    labels = torch.randint(0, vocab, (n,), generator=g).to(device)
    loss = chunked_cross_entropy(h, head, labels, chunk=1024)
    expected_loss = F.cross_entropy(ref(h) @ ref(head).t(), labels.cpu())
    out["loss_kernel"] = _rel(loss, expected_loss)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="a rehearsal on the CPU with tiny shapes")
    args = ap.parse_args()
    import torch

    shapes = [(4, 512), (2, 1024), (1, 2048), (4, 2048), (8, 2048), (2, 4096)]
    if args.cpu:
        shapes = [(2, 64), (4, 128)]
        torch.set_num_threads(2)
    model = build(args.cpu)
    lines = ["| rows x seq | plain loss | fused loss | fused+graphs loss | layer 0 fused vs original "
             "| rms_norm | rope | swiglu | flash vs sdpa | loss kernel |", "|" + "---|" * 10]
    for rows, seq in shapes:
        m = model_checks(model, rows, seq)
        o = op_checks(rows * seq, seq, args.cpu)
        lines.append(f"| {rows} x {seq} | {m['plain_loss']:.4f} | {m['fused_loss']:.4f} | {m['fused_graphs_loss']:.4f} | "
                     f"{m['layer0_fused_vs_original']:.2e} | " + " | ".join(f"{o[k]:.2e}" for k in
                     ("rms_norm", "rope", "swiglu", "flash_varlen_vs_sdpa", "loss_kernel")) + " |")
        print(lines[-1], flush=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    print("\n".join(lines))


if __name__ == "__main__":
    main()
