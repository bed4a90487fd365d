"""The speed benchmark's --profile summary: a step's GPU time in the categories benchmarks/NOTES.md
reads (GEMMs, attention, NF4 dequant, the masked LoRA A side, epilogues, loss, optimizer, the rest),
with the LM head's GEMMs moved to the loss. CPU only: a fake kernel list, and one real CPU profile
for the LM head's operator match."""

from pathlib import Path
from types import SimpleNamespace

from support.benchmarks import load_benchmark

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"

# (kernel name as torch.profiler reports it, device microseconds over 2 steps, launches over 2 steps)
KERNELS = [
    ("nvjet_hsh_256x128_64x4_1x2_h_bz_coopA_NTT", 300_000.0, 4000),
    ("void splitKreduce_kernel<32, 16, int, float, __nv_bfloat16, float>", 4_000.0, 200),
    ("void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<Flash_bwd_kernel_traits<128>>", 30_000.0, 128),
    ("_dequantize_nf4_kernel", 50_000.0, 400),
    ("void kDequantizeBlockwise<__nv_bfloat16, 512, 64, 8, 2>", 2_000.0, 20),
    ("_lora_a_kernel", 36_000.0, 900),
    ("_lora_x_backward_kernel", 22_000.0, 450),
    ("_lora_a_backward_kernel", 20_000.0, 450),
    ("_lora_rope_kernel", 6_000.0, 128),
    ("_rms_norm_backward_kernel", 4_000.0, 130),
    ("_lora_swiglu_kernel", 5_000.0, 128),
    ("_cross_entropy_rows_kernel", 3_000.0, 8),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor<float, 4>>",
     2_000.0, 4),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>", 1_000.0, 600),
]


def _bench():
    return load_benchmark("speed_vs_unsloth")


def test_kernels_fall_into_the_notes_categories():
    bench = _bench()
    got = {name: bench.kernel_category(name) for name, _, _ in KERNELS}
    assert [got[n] for n, _, _ in KERNELS] == [
        "GEMMs", "GEMMs", "attention", "NF4 dequant", "NF4 dequant", "masked LoRA A side", "masked LoRA A side",
        "masked LoRA A side", "epilogues/norms/RoPE/SwiGLU", "epilogues/norms/RoPE/SwiGLU",
        "epilogues/norms/RoPE/SwiGLU", "loss", "optimizer", "everything else"]


def test_summary_per_step_with_the_lm_head_gemms_moved_to_the_loss():
    bench = _bench()
    lm_head = {"nvjet_hsh_256x128_64x4_1x2_h_bz_coopA_NTT": 20_000.0}
    p = bench.summarize_profile(KERNELS, steps=2, wall_s=0.5, loss_us=lm_head)
    ms = p["ms_by_category"]
    assert list(ms) == list(bench.PROFILE_ORDER)
    assert ms["GEMMs"] == 142.0  # (300 + 4 - 20) / 2
    assert ms["loss"] == 11.5  # (3 + 20) / 2
    assert ms["masked LoRA A side"] == 39.0 and ms["NF4 dequant"] == 26.0 and ms["attention"] == 15.0
    assert ms["everything else"] == 0.5 and ms["optimizer"] == 1.0
    assert abs(sum(ms.values()) - p["gpu_busy_ms_per_step"]) < 0.1  # nothing lost or counted twice
    assert p["gpu_busy_ms_per_step"] == 242.5 and p["wall_ms_per_step"] == 250.0
    assert p["gpu_idle_ms_per_step"] == 7.5
    assert p["kernels_per_step"] == sum(c for _, _, c in KERNELS) // 2
    assert p["launches_by_category"]["masked LoRA A side"] == 900
    assert p["a_side_ms"] == {"lora_a": 18.0, "sum_planes": 0.0, "lora_x_backward": 11.0, "lora_a_backward": 10.0,
                           "dropout_mask": 0.0}
    assert p["lm_head_gemm_ms"] == 10.0
    # without the attribution the LM head stays among the GEMMs
    assert bench.summarize_profile(KERNELS, steps=2, wall_s=0.5)["ms_by_category"]["GEMMs"] == 152.0


def test_the_lm_head_is_found_by_its_vocabulary_sized_operand():
    import torch
    import torch.nn.functional as F
    from torch.profiler import ProfilerActivity, profile

    bench = _bench()
    hidden, head = torch.randn(4, 8), torch.randn(11, 8)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        logits = F.linear(hidden, head)
        _ = logits @ head  # the loss's hidden gradient
        _ = hidden @ torch.randn(8, 8)  # not the LM head
    # the real events have no kernels on the CPU: give the matching ones a fake launch each
    events = [SimpleNamespace(name=e.name, input_shapes=e.input_shapes,
                              kernels=[SimpleNamespace(name=f"k{i}", duration=10.0)]) for i, e in enumerate(prof.events())]
    found = bench.lm_head_kernel_us(events, vocab=11)
    assert len(found) == 2  # the two aten::mm with an 11-wide operand, not their aten::matmul parents
    names = {f"k{i}": e.name for i, e in enumerate(prof.events())}
    assert {names[k] for k in found} == {"aten::mm"}
    assert bench.lm_head_kernel_us(events, vocab=13) == {}


def test_the_profile_table_has_one_column_per_profiled_run():
    bench = _bench()
    p = bench.summarize_profile(KERNELS, steps=2, wall_s=0.5)
    results = [dict(name="8b-1024/ours", step_s=0.3017, tokens_per_s=13576.0, plan="micro-batch 2", profile=p),
               dict(name="8b-1024/lean", error="timed out"), dict(name="8b-1024/plain", step_s=0.7)]
    table = bench.profile_table(results)
    assert table.splitlines()[0] == "| per step, ms (kernels) | 8b-1024/ours |"
    assert "| masked LoRA A side | 39.0 (900) |" in table
    assert "|   of A side: lora_a | 18.0 |" in table
    assert "| step, unprofiled median | 301.7 |" in table
    assert bench.profile_table(results[1:]) == ""


def test_user_annotations_on_the_gpu_timeline_are_not_kernels():
    """The profiler puts the optimizer's record_function range on the GPU timeline too (1.26 ms at 8B
    in the session-9 profile): counting it adds time that its kernels already count."""
    bench = _bench()
    averages = [SimpleNamespace(key="_lora_a_kernel", self_device_time_total=10.0, count=2, device_type="cuda",
                                is_user_annotation=False),
                SimpleNamespace(key="Optimizer.step#AdamW.step", self_device_time_total=5.0, count=1, device_type="cuda",
                                is_user_annotation=True),
                SimpleNamespace(key="aten::mm", self_device_time_total=0.0, count=3, device_type="cpu",
                                is_user_annotation=False)]
    assert bench.device_kernels(averages, "cuda") == [("_lora_a_kernel", 10.0, 2)]


def _span(cat, name, ts, dur, tid=1, correlation=None):
    event = {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "tid": tid, "args": {}}
    if correlation is not None:
        event["args"]["correlation"] = correlation
    return event


def test_idle_gaps_are_charged_to_what_launched_the_kernel_after_them():
    """A synthetic Kineto trace of one step: two kernels back to back, a 30 us gap before a graph
    replay launched in the backward region, a 1.5 ms gap before the optimizer's kernel. Overlapping
    device events (a copy inside a kernel's span) are no gap."""
    bench = _bench()
    trace = {"traceEvents": [
        _span("user_annotation", "forward", 0, 85),
        _span("cpu_op", "aten::mm", 5, 10),
        _span("cuda_runtime", "cudaLaunchKernel", 6, 2, correlation=1),
        _span("kernel", "nvjet_gemm", 10, 40, tid=7, correlation=1),
        _span("cuda_runtime", "cudaLaunchKernel", 20, 2, correlation=2),
        _span("kernel", "_rms_norm_kernel", 50, 20, tid=7, correlation=2),
        _span("gpu_memcpy", "Memcpy DtoD", 55, 5, tid=8),
        _span("user_annotation", "backward", 88, 200),
        _span("cpu_op", "aten::zeros", 91, 4),  # ended before the launch at 98: not its operator
        _span("cpu_op", "FusedLayerBackward", 95, 10),
        _span("cpu_op", "autograd::engine::evaluate_function: FusedLayerBackward", 90, 50),
        _span("cuda_runtime", "cudaGraphLaunch", 98, 1, correlation=3),
        _span("kernel", "_lora_a_kernel", 100, 50, tid=7, correlation=3),
        _span("user_annotation", "optimizer", 1600, 100),
        _span("cpu_op", "Optimizer.step#AdamW.step", 1640, 50),
        _span("cuda_runtime", "cudaLaunchKernel", 1645, 3, correlation=4),
        _span("kernel", "multi_tensor_apply_kernel", 1650, 10, tid=7, correlation=4),
    ]}
    idle = bench.idle_gaps(trace, steps=1, min_gap_us=2.0)
    assert idle["by_launch"] == [
        ("optimizer / Optimizer.step#AdamW.step / cudaLaunchKernel", 1.5, 1),
        ("backward / FusedLayerBackward / cudaGraphLaunch", 0.03, 1),
    ]
    assert idle["idle_ms_per_step"] == 1.53 and idle["in_gaps_over_1ms"] == 1.5 and idle["in_shorter_gaps"] == 0.03


def test_small_kernels_are_grouped_by_what_launched_them():
    """A synthetic trace of one step: an eager cast under aten::to > aten::_to_copy, a fill launched
    twice by aten::zero_ under aten::zeros, a memcpy node and a copy of a graph replay (charged to
    the replay's cudaGraphLaunch), and a GEMM and a norm kernel, which are not small kernels."""
    bench = _bench()
    cast = ("void at::native::vectorized_elementwise_kernel<8, at::native::bfloat16_copy_kernel_cuda"
            "(at::TensorIteratorBase&)::{lambda(float)#1}, std::array<char*, 2ul> >(int, T2, T3)")
    fill = "void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>, std::array<char*, 1ul> >"
    trace = {"traceEvents": [
        _span("user_annotation", "forward", 0, 400),
        _span("cpu_op", "aten::to", 5, 20),
        _span("cpu_op", "aten::_to_copy", 6, 18),
        _span("cpu_op", "aten::copy_", 8, 10),
        _span("cuda_runtime", "cudaLaunchKernel", 10, 2, correlation=1),
        _span("kernel", cast, 20, 4, tid=7, correlation=1),
        _span("cpu_op", "aten::zeros", 30, 20),
        _span("cpu_op", "aten::zero_", 32, 15),
        _span("cuda_runtime", "cudaLaunchKernel", 35, 2, correlation=2),
        _span("kernel", fill, 40, 3, tid=7, correlation=2),
        _span("cuda_runtime", "cudaLaunchKernel", 40, 2, correlation=3),
        _span("kernel", fill, 45, 3, tid=7, correlation=3),
        _span("cpu_op", "aten::mm", 60, 10),
        _span("cuda_runtime", "cudaLaunchKernel", 61, 2, correlation=4),
        _span("kernel", "nvjet_sm90_tst_256x128", 70, 100, tid=7, correlation=4),
        _span("cpu_op", "_GraphedLayer", 200, 20),
        _span("cuda_runtime", "cudaGraphLaunch", 205, 5, correlation=5),
        _span("kernel", "_rms_norm_kernel", 210, 10, tid=7, correlation=5),
        _span("kernel", "memcpy128", 220, 13, tid=7, correlation=5),
        _span("kernel", "void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda>", 240, 7,
              tid=7, correlation=5),
        _span("kernel", "memcpy128", 250, 13, tid=7, correlation=5),
    ]}
    small = bench.small_kernels(trace, steps=1)
    assert small["by_launch"] == [
        ("forward / _GraphedLayer / cudaGraphLaunch / memcpy128", 0.03, 2),
        ("forward / _GraphedLayer / cudaGraphLaunch / unrolled_elementwise_kernel<direct_copy_kernel_cuda>", 0.01, 1),
        ("forward / aten::zeros > aten::zero_ / cudaLaunchKernel / vectorized_elementwise_kernel<4, FillFunctor<float>>",
         0.01, 2),
        ("forward / aten::to > aten::copy_ / cudaLaunchKernel / vectorized_elementwise_kernel<8, "
         "bfloat16_copy_kernel_cuda::{lambda#1}>", 0.0, 1),
    ]
    assert small["ms_per_step"] == 0.04 and small["launches_per_step"] == 6  # 13+13+7+3+3+4 us; no GEMM, no norm
    assert bench.small_kernels(trace, steps=2)["launches_per_step"] == 3
    table = bench.profile_table([dict(name="8b-1024/ours", step_s=0.3, plan="p", profile=dict(
        bench.summarize_profile(KERNELS, steps=2, wall_s=0.5), small=small))])
    assert "8b-1024/ours: small kernels 0.04 ms per step (6 launches)" in table
    assert "| forward / _GraphedLayer / cudaGraphLaunch / memcpy128 | 0.03 | 2 |" in table
