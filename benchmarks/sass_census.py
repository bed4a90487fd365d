"""What the masked LoRA kernels and lora_swiglu_ compile to on an H100/H200 (sm_90), without a
GPU: each kernel is compiled by Triton for that target with its arguments specialized as the
launcher's real calls specialize them (pointers 16-byte aligned, widths divisible by 16, the
do_not_specialize token counts left as plain integers), and its SASS (Triton's bundled cuobjdump) is counted: global loads
by width, shared-memory traffic, barriers, registers.

Session 12 found this way that lora_a loaded x one 2-byte element at a time (its split start was a
runtime value the compiler could not prove aligned) where lora_a_backward, over the same tiles,
used 16-byte asynchronous copies: 12.8 -> 5.6 ms an 8B step once fixed. tests/test_sass_census.py
keeps it from coming back, and keeps lora_swiglu_'s tile loop pipelined (session 16).

    python benchmarks/sass_census.py            # a table; --json for the counts
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "trainer_image"))

_OPCODE = re.compile(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P[0-9T]\s+)?([A-Z0-9_]+(?:\.[A-Z0-9_.]+)?)")


def _kernels():
    """name: (jit function, argument types, constexprs, warps, stages), as the launchers' defaults
    run them at an 8B layer (bf16, r 16): the masked LoRA kernels and lora_swiglu_. Types: '*bf16'
    etc. are pointers (16-byte aligned); 'i32/16' an integer the launcher's values make divisible
    by 16; plain 'i32' one that is not specialized; a constexpr given a value is folded in."""
    from qlora_trainer.acceleration import triton_ops as T

    a_cfg, ab, xb, sw = T.LORA_A_CONFIG, T.LORA_A_BACKWARD_LAUNCH, T.LORA_X_BACKWARD_LAUNCH, T.LORA_SWIGLU_LAUNCH
    dropout = {"seed_ptr": "*i64", "p": "fp32", "H": "i32/16", "r": "i32/16"}
    return {
        "lora_a": (T._lora_a_kernel, {"x_ptr": "*bf16", "a_ptr": "*bf16", "out_ptr": "*fp32", **dropout},
                   {"BLOCK_M": a_cfg.block_m, "BLOCK_K": a_cfg.block_k, "BLOCK_R": 16, "IEEE": False, "NPROJ": 1,
                    "TRANSPOSED": a_cfg.transposed}, a_cfg.num_warps, a_cfg.num_stages),
        "lora_a_backward": (T._lora_a_backward_kernel,
                            {"ga_ptr": "*bf16", "x_ptr": "*bf16", "out_ptr": "*fp32", **dropout},
                            {"BLOCK_N": ab.block_m, "BLOCK_H": ab.block_h, "BLOCK_R": 16, "IEEE": False},
                            ab.warps, ab.stages),
        "lora_x_backward_": (T._lora_x_backward_kernel, {"gx_ptr": "*bf16", "ga_ptr": "*bf16", "a_ptr": "*bf16", **dropout},
                             {"BLOCK_M": xb.block_m, "BLOCK_H": xb.block_h, "BLOCK_R": 16, "IEEE": False},
                             xb.warps, xb.stages),
        # the SwiGLU epilogue's default launch: persistent programs whose tile loop is pipelined
        "lora_swiglu_": (T._lora_swiglu_persistent_kernel,
                         {"gu_ptr": "*bf16", "a_ptr": "*bf16", "b_ptr": "*bf16", "h_ptr": "*bf16", "inter": "i32/16",
                          "R": "i32/16"},
                         {"BLOCK_M": sw.block_m, "BLOCK_N": sw.block_n, "BLOCK_R": 16, "IEEE": False,
                          "STAGES": sw.stages}, sw.warps, sw.stages),
    }


def _tool(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def census(fn, types: dict, constexprs: dict, warps: int, stages: int) -> dict:
    """Opcode counts (all of them, and the memory and barrier ones by name), registers a thread."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, attrs = {}, {}
    for i, arg in enumerate(fn.arg_names):
        if arg in constexprs:
            signature[arg] = "constexpr"
            continue
        kind = types.get(arg, "i32")
        if kind.endswith("/16") or kind.startswith("*"):
            attrs[(i,)] = [["tt.divisibility", 16]]
        signature[arg] = kind.removesuffix("/16")
    kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                            target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        sass = subprocess.run([_tool("cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", str(cubin)], capture_output=True, text=True,
                               check=True).stdout
    ops = collections.Counter(m.group(1) for m in _OPCODE.finditer(sass))
    memory = {k: v for k, v in sorted(ops.items())
              if k.startswith(("LDG", "STG", "LDS", "STS", "BAR", "REDG", "HGMMA", "HMMA", "I2F"))}
    return {"instructions": sum(ops.values()), "registers": int(re.search(r"REG:(\d+)", usage).group(1)), "ops": memory}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the counts as JSON")
    args = parser.parse_args()
    result = {name: census(*spec) for name, spec in _kernels().items()}
    if args.json:
        print(json.dumps(result))
        return
    print("| kernel | registers | instructions | loads, stores, barriers, dots |\n|---|---|---|---|")
    for name, c in result.items():
        ops = ", ".join(f"{k} {v}" for k, v in c["ops"].items())
        print(f"| {name} | {c['registers']} | {c['instructions']} | {ops} |")


if __name__ == "__main__":
    main()
