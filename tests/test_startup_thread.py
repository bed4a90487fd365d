"""The start-up thread (startup_thread.py): the training libraries' imports, then the GPU's warm-up.
The startup phase waits only for what is left of it, and nothing that fails there fails the run by
itself (the main thread's import, or the model load, reports the real error)."""

import importlib.util
import logging
import sys
import time

import torch
from qlora_trainer.startup_thread import StartupThread


def test_the_wait_is_only_what_is_left_of_the_warmup():
    warmup = StartupThread(lambda: time.sleep(0.3))
    time.sleep(0.2)  # the run downloads and tokenizes meanwhile
    waited = warmup.wait()
    assert warmup.seconds >= 0.3 and warmup.error is None
    assert waited < 0.25  # not the whole 0.3 s: the thread ran alongside
    assert warmup.wait() < 0.05  # a second wait finds it done


def test_a_failed_warmup_is_logged_not_raised(caplog):
    def broken():
        raise RuntimeError("no CUDA-capable device is detected")

    with caplog.at_level(logging.WARNING, logger="qlora_trainer.startup_thread"):
        warmup = StartupThread(broken)
        warmup.wait()
    assert isinstance(warmup.error, RuntimeError) and warmup.seconds is not None
    assert "no CUDA-capable device" in caplog.text


def test_the_thread_imports_first_and_warms_no_device_without_a_gpu(monkeypatch):
    import qlora_trainer.startup_thread as startup_thread

    warmed = []
    monkeypatch.setattr(startup_thread, "warm_device", warmed.append)
    monkeypatch.setattr(startup_thread, "warm_loader", lambda: warmed.append("loader"))
    monkeypatch.delitem(sys.modules, "colorsys", raising=False)
    startup = StartupThread.start(0, ("colorsys",))
    startup.wait()
    assert "colorsys" in sys.modules and startup.error is None
    assert warmed == (["loader", 0] if torch.cuda.is_available() else [])
    StartupThread.start(None).wait()  # index None: nothing to warm, whatever the machine has
    assert warmed == (["loader", 0] if torch.cuda.is_available() else [])


def test_an_import_that_fails_on_the_thread_is_left_to_the_main_threads_import(caplog):
    """The run's own import statement after the startup phase meets the same error where failures
    are reported (cli.py); the thread only logs it, and the modules after it are not tried."""
    with caplog.at_level(logging.WARNING, logger="qlora_trainer.startup_thread"):
        startup = StartupThread.start(None, ("qlora_no_such_module", "colorsys"))
        startup.wait()
    assert isinstance(startup.error, ModuleNotFoundError)
    assert "qlora_no_such_module" in caplog.text


def test_the_loader_warmup_builds_transformers_conversion_rules_once():
    from qlora_trainer.startup_thread import warm_loader
    from transformers import conversion_mapping

    conversion_mapping._checkpoint_conversion_mapping_cache = None  # as in a fresh process
    warm_loader()
    built = conversion_mapping._checkpoint_conversion_mapping_cache
    assert isinstance(built, dict) and len(built) > 10  # every architecture's rules, built
    began = time.perf_counter()
    conversion_mapping.get_checkpoint_conversion_mapping("qwen2")  # what from_pretrained asks next
    assert conversion_mapping._checkpoint_conversion_mapping_cache is built  # reused, not rebuilt
    assert time.perf_counter() - began < 0.05


def test_the_warmup_lowers_the_gil_switch_interval_while_it_runs_python():
    """The warm-up's Python holds the GIL; the run (tokenizing, downloading) releases it in every
    native call and must not wait the default 5 ms to get it back each time (startup_thread.py):
    the interval is lowered while the warm-up runs and the process's own comes back after it.
    (The effect itself is timed in the GPU benchmark's tokenize phase, not here: a timing bound
    on a loaded 2-core CI machine would be a flake.)"""
    default = sys.getswitchinterval()
    seen = []
    warmup = StartupThread(lambda: seen.append(sys.getswitchinterval()))
    warmup.wait()
    assert seen == [min(default, 0.0005)]
    assert sys.getswitchinterval() == default


def test_the_warmup_leaves_an_interval_set_meanwhile_alone():
    """Someone else changed the interval while the warm-up ran: theirs stays."""
    default = sys.getswitchinterval()
    try:
        warmup = StartupThread(lambda: sys.setswitchinterval(0.002))
        warmup.wait()
        assert sys.getswitchinterval() == 0.002
    finally:
        sys.setswitchinterval(default)


def _startup_phase_imports() -> set[str]:
    """The modules sft._run's startup phase imports (its `with phases.phase("startup")` block)."""
    import ast
    import inspect

    from qlora_trainer import sft

    tree = ast.parse(inspect.getsource(sft._run))
    blocks = [node for node in ast.walk(tree) if isinstance(node, ast.With)
              and any(isinstance(item.context_expr, ast.Call) and item.context_expr.args
                      and getattr(item.context_expr.args[0], "value", None) == "startup" for item in node.items)]
    assert len(blocks) == 1, "sft._run has one startup phase"
    found = set()
    for node in ast.walk(blocks[0]):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            # `from pkg import mod` imports pkg.mod when mod is a module, else pkg (a name in it)
            for alias in node.names:
                name = f"{node.module}.{alias.name}"
                found.add(name if _is_module(name) else node.module)
    return found


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def test_the_start_up_thread_imports_what_the_startup_phase_imports():
    """TRAINING_MODULES is kept by hand beside _run's import block: a module added to the block and
    not to the list would be imported on the main thread, inside the startup phase, unhidden; one
    left in the list after it left the block would be imported for nothing."""
    from qlora_trainer.sft import TRAINING_MODULES

    phase = _startup_phase_imports()
    assert phase and phase <= set(TRAINING_MODULES), f"imported in the startup phase only: {phase - set(TRAINING_MODULES)}"
    ours = {m for m in TRAINING_MODULES if m.startswith("qlora_trainer.")}
    assert ours <= phase, f"on the start-up thread but no longer imported by _run: {ours - phase}"
    assert TRAINING_MODULES[0] == "torch"  # the heaviest first: the others import it anyway
