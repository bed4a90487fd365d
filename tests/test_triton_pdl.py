"""Programmatic dependent launch in acceleration/triton_ops.py (its docstring says why): a kernel
launched with PDL may start while its predecessor still writes, so every launched kernel must wait
(griddepcontrol.wait) before its first memory access, and the "off" kernels must be today's code.

Without a GPU: the kernels are compiled for sm_90 by Triton on this CPU, as benchmarks/sass_census.py
does, in each mode, and their PTX and SASS read; every kernel's head and launch are checked in the
source; and the mode's resolution and validation at import run in a child Python (fresh env)."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[1]
TRITON_OPS = ROOT / "trainer_image" / "qlora_trainer" / "acceleration" / "triton_ops.py"

# PTX: a memory access or synchronization (ld.param, the kernel's arguments, is neither).
PTX_MEMORY = re.compile(r"^\s*(?:@!?%p\w+\s+)?(?:(?:ld(?!\.param)|st|atom|red|cp|prefetch|mbarrier|fence|membar)\.|bar\b)")
# SASS: griddepcontrol.wait is ACQBULK, launch_dependents PREEXIT on sm_90; LDC/ULDC read arguments.
SASS_WAIT, SASS_RELEASE = "ACQBULK", "PREEXIT"
SASS_MEMORY = ("LD", "ST", "RED", "ATOM", "UTMA", "UBLKCP", "BAR", "MEMBAR", "SYNCS", "CCTL")
SASS_NOT_MEMORY = ("LDC", "ULDC")


def _census():
    spec = importlib.util.spec_from_file_location("sass_census", ROOT / "benchmarks" / "sass_census.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # puts trainer_image on sys.path
    return module


def _kernels(S):
    """name: (jit function, argument types, constexprs, warps, stages), as the launchers run them."""
    from qlora_trainer.acceleration import triton_ops as T

    return {
        "rms_norm": (T._rms_norm_kernel, {"x_ptr": "*bf16", "w_ptr": "*bf16", "y_ptr": "*bf16", "rstd_ptr": "*fp32",
                                          "H": "i32/16", "eps": "fp32"}, {"BLOCK": 4096}, 8, 3),
        # its body is one helper call (_rope_tile): the wait goes before the helper's loads
        "rope": (T._rope_kernel, {"x_ptr": "*bf16", "cos_ptr": "*fp32", "sin_ptr": "*fp32", "HALF": "i32/16"},
                 {"BLOCK_ROWS": 32, "BLOCK_D": 64, "MODE": 0}, 4, 3),
        "lora_a": S._kernels()["lora_a"],  # its first statement reads the dropout seed from memory
        "cross_entropy_rows": (T._cross_entropy_rows_kernel,
                               {"logits_ptr": "*bf16", "labels_ptr": "*i64", "loss_ptr": "*fp32", "V": "i32/16",
                                "stride": "i32/16", "scale": "*fp32"},
                               {"WRITE_GRAD": True, "BLOCK": 4096, "SCALE_IN_MEMORY": True}, 8, 3),
    }


def _compile(name: str, mode: str) -> dict:
    S = _census()
    from qlora_trainer.acceleration import triton_ops as T

    fn, types, constexprs, warps, stages = _kernels(S)[name]
    level = T.pdl_level(mode)
    launch = T.pdl_launch_options(level)  # what the launchers pass: {} when off
    options = {k: v for k, v in launch.items() if k not in fn.arg_names}  # compile options (launch_pdl)
    constexprs = {**constexprs, **{k: v for k, v in launch.items() if k in fn.arg_names}}  # PDL
    asm = S.compile_sm90(fn, types, constexprs, warps, stages, **options)
    ptx = [ln.strip() for ln in asm["ptx"].splitlines()
           if ln.strip() and not ln.strip().startswith(("//", ".", "{", "}", "$"))]
    return {"ptx": ptx, "sass": S.sass_opcodes(asm["sass"]), "launch_pdl": asm["launch_pdl"]}


def _first(items: list[str], test) -> int:
    return next((i for i, item in enumerate(items) if test(item)), len(items))


CASES = [(name, mode) for name in ("rms_norm", "rope", "lora_a", "cross_entropy_rows") for mode in ("off", "early")]


@pytest.mark.parametrize(("name", "mode"), [*CASES, ("lora_a", "wait")])
def test_a_pdl_kernel_waits_before_its_first_memory_access_and_an_off_one_has_no_pdl(name, mode):
    got = _compile(name, mode)
    ptx, sass = got["ptx"], got["sass"]
    waits = [i for i, ln in enumerate(ptx) if ln.startswith("griddepcontrol.wait")]
    releases = [i for i, ln in enumerate(ptx) if ln.startswith("griddepcontrol.launch_dependents")]
    first_access = _first(ptx, PTX_MEMORY.match)
    sass_access = _first(sass, lambda op: op.startswith(SASS_MEMORY) and not op.startswith(SASS_NOT_MEMORY))
    assert first_access < len(ptx) and sass_access < len(sass), "no memory access found: the patterns are stale"
    if mode == "off":
        assert not waits and not releases, f"{name} off has griddepcontrol: {[ptx[i] for i in waits + releases]}"
        assert SASS_WAIT not in sass and SASS_RELEASE not in sass, sass[:40]
        assert not got["launch_pdl"]
        return
    assert got["launch_pdl"], "the compile option launch_pdl was not taken"
    assert len(waits) == 1, f"{name} {mode}: {len(waits)} griddepcontrol.wait"
    assert waits[0] < first_access, (f"{name} {mode}: '{ptx[first_access]}' before griddepcontrol.wait:\n"
                                     + "\n".join(ptx[:waits[0] + 1]))
    assert SASS_WAIT in sass and sass.index(SASS_WAIT) < sass_access, (
        f"{name} {mode}: SASS {sass[sass_access]} before {SASS_WAIT}: {sass[:sass_access + 1]}")
    if mode == "early":
        assert len(releases) == 1 and waits[0] < releases[0] < first_access, (name, waits, releases, first_access)
        assert SASS_RELEASE in sass and sass.index(SASS_WAIT) < sass.index(SASS_RELEASE), sass[:40]
    else:
        assert not releases and SASS_RELEASE not in sass, f"{name} wait releases its successor early"


def _jit_functions() -> dict[str, ast.FunctionDef]:
    tree = ast.parse(TRITON_OPS.read_text())
    return {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)
            and any("triton.jit" in ast.unparse(d) for d in n.decorator_list)}


def _launches() -> dict[str, list[ast.Call]]:
    """kernel name: its launches (`kernel[grid](...)`)."""
    calls: dict[str, list[ast.Call]] = {}
    for node in ast.walk(ast.parse(TRITON_OPS.read_text())):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript)
                and isinstance(node.func.value, ast.Name)):
            calls.setdefault(node.func.value.id, []).append(node)
    return calls


def test_every_launched_kernel_waits_first_and_every_launch_passes_the_mode():
    """All of them, not only the compiled few: a launched kernel's first statement is the wait
    (_pdl_enter(PDL), PDL a constexpr defaulting to off) and each launch unpacks _LAUNCH; a helper
    (called from kernels, never launched) has neither, so it cannot wait in the middle of one."""
    jits, launches = _jit_functions(), _launches()
    launched = {name for name in launches if name in jits}
    assert len(launched) >= 15 and len(jits) > len(launched), (sorted(launched), sorted(jits))
    for name, fn in jits.items():
        body = fn.body[1:] if isinstance(fn.body[0], ast.Expr) and isinstance(fn.body[0].value, ast.Constant) else fn.body
        first = ast.unparse(body[0])
        enters = [n for n in ast.walk(fn) if isinstance(n, ast.Call) and ast.unparse(n.func) == "_pdl_enter"]
        if name == "_pdl_enter":
            continue
        if name not in launched:
            assert not enters and "PDL" not in [a.arg for a in fn.args.args], f"helper {name} has the PDL wait"
            continue
        assert first == "_pdl_enter(PDL)", f"{name} starts with {first!r}, not the wait"
        assert len(enters) == 1, f"{name} calls _pdl_enter {len(enters)} times"
        params = fn.args.args
        assert params[-1].arg == "PDL" and ast.unparse(params[-1].annotation) == "tl.constexpr", name
        assert ast.unparse(fn.args.defaults[-1]) == "0", f"{name}: PDL must default to 0 (off)"
        for call in launches[name]:
            assert any(k.arg is None and ast.unparse(k.value) == "_LAUNCH" for k in call.keywords), (
                f"a launch of {name} does not pass **_LAUNCH (line {call.lineno})")


CHILD = r'''
import json, os, sys
import qlora_trainer.acceleration as package
from qlora_trainer.acceleration import fused_ops as F
from qlora_trainer.acceleration import triton_ops as T
out = {"mode": T.PDL_MODE, "launch": T._LAUNCH, "early": T.pdl_launch_options(T.pdl_level("early")),
       "off": T.pdl_launch_options(T.pdl_level("off"))}
del sys.modules[T.__name__], package.triton_ops  # import it afresh, through fused_ops, with a bad value
os.environ["QLORA_PDL"] = "eager"
F._TRITON.clear()
try:
    out["bad"] = f"no error; fused_ops got {F._triton_ops()}"
except ValueError as e:
    out["bad"] = str(e)
print("PDL_JSON=" + json.dumps(out))
'''


def test_the_mode_is_off_in_the_interpreter_and_a_bad_value_fails_the_import():
    env = {**os.environ, "TRITON_INTERPRET": "1", "QLORA_PDL": "early",
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT / "trainer_image"), os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=300)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("PDL_JSON=")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    out = json.loads(lines[-1].removeprefix("PDL_JSON="))
    assert out["mode"] == "off" and out["launch"] == {}, out  # the interpreter would refuse launch_pdl
    assert out["early"] == {"launch_pdl": True, "PDL": 2} and out["off"] == {}, out
    # a ValueError out of fused_ops: not hidden behind its fallback to torch for a missing Triton
    assert "QLORA_PDL must be one of off, wait, early, got 'eager'" in out["bad"], out
