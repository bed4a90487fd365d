"""Where does the fused path's loss leave the plain one? A GPU diagnostic, one table per question.

Session 3's full benchmark call found the fused path's step-0 loss off the plain recipe's where a
micro-step holds rows of 2,048 tokens (Qwen2.5-1.5B shape, LoRA B still zero: 12.24 against 12.06
for plain and Unsloth), while rows of 512 and 1,024 tokens agreed to 1e-3. On the CPU, the full
28-layer shape at 2,048 tokens gives 12.259 in fp32, plain bf16 and fused bf16 alike, so either
side may be the one that departs on the GPU. (The trainer run's flat training loss was another
bug, found and fixed since: the fused layer's cached LoRA factors missed fused AdamW's steps.)

Tables:
1. Step-0 loss per shape on the full 28-layer Qwen2.5-1.5B shape, initialised like the speed
   benchmark's checkpoints, LoRA B zero: the plain model with SDPA and with eager attention in
   bf16, the plain model in fp32 (the arbiter), the fused layer with graphs off and on, and the
   per-projection path; then the same on the NF4-quantized model (bitsandbytes), where present.
2. Decoder layer 0, fused forward against the layer's own forward, and each GPU operation against
   its torch reference on the CPU at that token count.
3. Three optimizer steps (fused AdamW) of the plain and the fused model side by side.

    python3 benchmarks/fused_path_parity.py            # on the GPU machine (bf16)
    python3 benchmarks/fused_path_parity.py --cpu      # rehearsal here, tiny shapes, fp32
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "trainer_image"))
SITE = Path("/tmp/qlora-bench-site")  # where speed_vs_unsloth.py unpacks the carried packages

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
QWEN_1_5B = dict(hidden_size=1536, intermediate_size=8960, num_attention_heads=12, num_key_value_heads=2,
                 vocab_size=151936, num_hidden_layers=28)
TINY = dict(hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2, vocab_size=1000,
            num_hidden_layers=2)


def _rel(a, b) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def build_base(cpu: bool):
    """bf16 (fp32 on the CPU) Qwen2 of the 1.5B shape: 2-D weights N(0, 0.02), 1-D ones, like the
    speed benchmark's checkpoints."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(tie_word_embeddings=True, max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6,
                         attn_implementation="sdpa", **(TINY if cpu else QWEN_1_5B))
    dtype, device = (torch.float32, "cpu") if cpu else (torch.bfloat16, "cuda")
    with torch.device(device):
        model = Qwen2ForCausalLM(config).to(dtype)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g, device=device, dtype=torch.float32).mul_(0.02))
            else:
                p.fill_(1.0)
    return model


def nf4_base(base):
    """The same weights, quantized NF4 with double quantization and bf16 compute (or None)."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return None
    folder = tempfile.mkdtemp(prefix="parity-nf4-")
    base.save_pretrained(folder)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=quant, dtype=torch.bfloat16,
                                                attn_implementation="sdpa", device_map={"": 0})


def with_lora(base):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(base, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS,
                                           task_type="CAUSAL_LM"))


def accelerated(model, rows: int, graphs: bool, fused: bool = True):
    from qlora_trainer.acceleration import apply_acceleration
    from qlora_trainer.acceleration.planner import MemoryPlan

    layers = model.get_base_model().config.num_hidden_layers
    os.environ["QLORA_CUDA_GRAPHS"] = "1" if graphs else "0"
    fast = copy.deepcopy(model)
    plan = MemoryPlan(micro_batch=rows, grad_accum=1, recompute="full", recompute_layers=layers, cached_layers=0,
                      ce_chunk_tokens=2048, packing=False, predicted_peak_bytes=0, predicted_tokens_per_s=0.0,
                      budget_bytes=0, policy="parity", fused_layers=fused)
    apply_acceleration(fast, plan)
    os.environ.pop("QLORA_CUDA_GRAPHS")
    fast.train()
    return fast


def _loss(model, ids, grad: bool) -> float:
    import torch

    items = int(ids.shape[0] * (ids.shape[1] - 1))
    model.train()
    with torch.set_grad_enabled(grad):  # the fast paths only run in a training forward with grad on
        out = model(input_ids=ids, labels=ids, num_items_in_batch=items).loss
    return float(out.detach())


def loss_checks(model, fp32, ids, with_eager: bool) -> dict:
    """Step-0 losses of one batch on every path (LoRA B zero: the adapter adds nothing yet)."""
    import torch

    lm = model.get_base_model()
    out = {"plain_sdpa": _loss(model, ids, grad=False)}
    if with_eager:
        lm.set_attn_implementation("eager")
        out["plain_eager"] = _loss(model, ids, grad=False)
        lm.set_attn_implementation("sdpa")
    if fp32 is not None:
        out["plain_fp32"] = _loss(fp32, ids, grad=False)
    for name, graphs, fused in (("fused", False, True), ("fused_graphs", True, True), ("per_projection", False, False)):
        if graphs and not ids.is_cuda:
            continue
        fast = accelerated(model, ids.shape[0], graphs, fused)
        for _ in range(2 if graphs else 1):  # graphs capture on the first call and replay on the next
            out[name] = _loss(fast, ids, grad=True)
        del fast
        if ids.is_cuda:
            torch.cuda.empty_cache()
    return out


def layer0_check(model, ids) -> float:
    """Decoder layer 0 alone, eager: the fused forward against the layer's own."""
    import torch

    fast = accelerated(model, ids.shape[0], graphs=False)
    flm = fast.get_base_model()
    layer = flm.model.layers[0]
    rows, seq = ids.shape
    with torch.enable_grad():
        hidden = flm.model.embed_tokens(ids)
        positions = torch.arange(seq, device=ids.device)[None].expand(rows, -1)
        rope = flm.model.rotary_emb(hidden, positions)
        fused = layer(hidden, position_embeddings=rope)
        fused = fused[0] if isinstance(fused, tuple) else fused
        original = layer._qlora_original_forward(hidden, position_embeddings=rope)
        original = original[0] if isinstance(original, tuple) else original
    return _rel(fused, original)


def op_checks(n: int, seq: int, cpu: bool) -> dict:
    """Each GPU operation at n tokens (rows of `seq`) against its torch reference on the CPU."""
    import torch
    import torch.nn.functional as F
    from qlora_trainer.acceleration import attention
    from qlora_trainer.acceleration import fused_ops as ops
    from qlora_trainer.acceleration.fused_layer import rows_pack
    from qlora_trainer.acceleration.kernels import chunked_cross_entropy

    device, dtype = ("cpu", torch.float32) if cpu else ("cuda", torch.bfloat16)
    d = (TINY if cpu else QWEN_1_5B)
    hidden, inter, heads, kv, vocab = (d["hidden_size"], d["intermediate_size"], d["num_attention_heads"],
                                       d["num_key_value_heads"], d["vocab_size"])
    hd = hidden // heads
    g = torch.Generator().manual_seed(1)
    rnd = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(device, dtype)  # noqa: E731
    ref = lambda t: t.detach().float().cpu()  # noqa: E731
    out = {}
    x, w = rnd(n, hidden), rnd(hidden, scale=0.1) + 1
    y, _ = ops.rms_norm(x, w, 1e-6)
    out["rms_norm"] = _rel(y, ops.rms_norm(ref(x), ref(w), 1e-6)[0])
    qkv = rnd(n, heads + 2 * kv, hd)
    cos, sin = rnd(n, hd), rnd(n, hd)
    expected = ref(qkv)
    ops.rope_(qkv[:, :heads + kv], cos, sin)
    ops.rope_(expected[:, :heads + kv], ref(cos), ref(sin))
    out["rope"] = _rel(qkv, expected)
    gu = rnd(n, 2 * inter)
    out["swiglu"] = _rel(ops.swiglu(gu), ops.swiglu(ref(gu)))
    packed = rnd(n, heads + 2 * kv, hd)  # strided q/k/v views of one buffer, as the fused layer passes them
    q, k, v = packed[:, :heads], packed[:, heads:heads + kv], packed[:, heads + kv:]
    cu, max_len = rows_pack(n // seq, seq, device)
    attn, _ = attention.forward(q, k, v, cu, max_len, hd ** -0.5)
    rows = []
    for r in range(n // seq):
        part = [ref(t[r * seq:(r + 1) * seq]).transpose(0, 1)[None] for t in (q, k, v)]
        rows.append(F.scaled_dot_product_attention(*part, is_causal=True, enable_gqa=True)[0].transpose(0, 1))
    out["flash_varlen_vs_sdpa"] = _rel(attn, torch.cat(rows))
    h, head = rnd(n, hidden), rnd(vocab, hidden, scale=0.05)
    labels = torch.randint(0, vocab, (n,), generator=g).to(device)
    loss = chunked_cross_entropy(h, head, labels, chunk=2048)
    out["loss_kernel"] = _rel(loss, F.cross_entropy(ref(h) @ ref(head).t(), labels.cpu()))
    return out


def training_check(model, ids, steps: int = 3) -> tuple[list, list]:
    """Plain and fused models trained side by side with fused AdamW: their losses per step."""
    import torch

    fast = accelerated(model, ids.shape[0], graphs=False)
    plain = copy.deepcopy(model)
    result = []
    for m in (plain, fast):
        params = [p for p in m.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0, fused=ids.is_cuda)
        losses = []
        for _ in range(steps):
            m.train()
            loss = m(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
        result.append(losses)
        del opt
    return result[0], result[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="a rehearsal on the CPU with tiny shapes")
    args = ap.parse_args()
    if (SITE / "bitsandbytes").exists():
        sys.path.append(str(SITE))
    import torch

    shapes = [(4, 512), (2, 1024), (1, 2048), (4, 2048), (8, 2048), (2, 4096)]
    if args.cpu:
        shapes = [(2, 64), (4, 128)]
        torch.set_num_threads(2)
    else:
        torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 arbiter in real fp32
    base = build_base(args.cpu)
    fp32 = None if args.cpu else copy.deepcopy(base).float()
    quantized = None if args.cpu else nf4_base(base)
    model = with_lora(base)
    nf4 = with_lora(quantized) if quantized is not None else None
    vocab = model.get_base_model().config.vocab_size
    keys = ["plain_sdpa", "plain_eager", "plain_fp32", "fused", "fused_graphs", "per_projection"]
    nf4_keys = ["plain_sdpa", "fused", "fused_graphs", "per_projection"]
    table1 = ["| rows x seq | " + " | ".join(keys) + " | NF4: " + " | NF4: ".join(nf4_keys) + " |",
              "|" + "---|" * (1 + len(keys) + len(nf4_keys))]
    table2 = ["| rows x seq | layer 0 fused vs original | rms_norm | rope | swiglu | flash vs sdpa | loss kernel |",
              "|" + "---|" * 7]
    for rows, seq in shapes:
        ids = torch.randint(0, min(vocab, 49152), (rows, seq), generator=torch.Generator().manual_seed(rows * seq))
        ids = ids.to("cpu" if args.cpu else "cuda")
        m = loss_checks(model, fp32, ids, with_eager=rows * seq <= 8192)
        q = loss_checks(nf4, None, ids, with_eager=False) if nf4 is not None else {}
        table1.append(f"| {rows} x {seq} | " + " | ".join(f"{m[k]:.4f}" if k in m else "-" for k in keys) + " | "
                      + " | ".join(f"{q[k]:.4f}" if k in q else "-" for k in nf4_keys) + " |")
        print(table1[-1], flush=True)
        o = op_checks(rows * seq, seq, args.cpu)
        table2.append(f"| {rows} x {seq} | {layer0_check(model, ids):.2e} | " + " | ".join(
            f"{o[k]:.2e}" for k in ("rms_norm", "rope", "swiglu", "flash_varlen_vs_sdpa", "loss_kernel")) + " |")
        print(table2[-1], flush=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    rows, seq = shapes[0]
    ids = torch.randint(0, min(vocab, 49152), (rows, seq), generator=torch.Generator().manual_seed(7))
    plain_losses, fused_losses = training_check(model, ids.to("cpu" if args.cpu else "cuda"))
    table3 = [f"| {rows} x {seq}, fused AdamW lr 1e-3 | " + " | ".join(f"step {i}" for i in range(len(plain_losses))) + " |",
              "|" + "---|" * (1 + len(plain_losses)),
              "| plain | " + " | ".join(f"{x:.4f}" for x in plain_losses) + " |",
              "| fused | " + " | ".join(f"{x:.4f}" for x in fused_losses) + " |"]
    print("\n".join(["", *table1, "", *table2, "", *table3]))


if __name__ == "__main__":
    main()
