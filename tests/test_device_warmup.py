"""The GPU warm-up thread (device_warmup.py): the quantize phase waits only for what is left of it,
and a warm-up that fails never fails the run by itself (the model load reports the real error)."""

import logging
import sys
import threading
import time

import torch
from qlora_trainer.device_warmup import DeviceWarmup


def test_the_wait_is_only_what_is_left_of_the_warmup():
    warmup = DeviceWarmup(lambda: time.sleep(0.3))
    assert warmup.active
    time.sleep(0.2)  # the run downloads and tokenizes meanwhile
    waited = warmup.wait()
    assert warmup.seconds >= 0.3 and warmup.error is None
    assert waited < 0.25  # not the whole 0.3 s: the thread ran alongside
    assert warmup.wait() < 0.05  # a second wait finds it done


def test_a_failed_warmup_is_logged_not_raised(caplog):
    def broken():
        raise RuntimeError("no CUDA-capable device is detected")

    with caplog.at_level(logging.WARNING, logger="qlora_trainer.device_warmup"):
        warmup = DeviceWarmup(broken)
        warmup.wait()
    assert isinstance(warmup.error, RuntimeError) and warmup.seconds is not None
    assert "no CUDA-capable device" in caplog.text


def test_nothing_to_warm_without_a_gpu():
    warmup = DeviceWarmup.start(None)
    assert not warmup.active and warmup.wait() < 0.01
    assert DeviceWarmup.start(0).active == torch.cuda.is_available()


def test_the_loader_warmup_builds_transformers_conversion_rules_once():
    from qlora_trainer.device_warmup import warm_loader
    from transformers import conversion_mapping

    conversion_mapping._checkpoint_conversion_mapping_cache = None  # as in a fresh process
    warm_loader()
    built = conversion_mapping._checkpoint_conversion_mapping_cache
    assert isinstance(built, dict) and len(built) > 10  # every architecture's rules, built
    began = time.perf_counter()
    conversion_mapping.get_checkpoint_conversion_mapping("qwen2")  # what from_pretrained asks next
    assert conversion_mapping._checkpoint_conversion_mapping_cache is built  # reused, not rebuilt
    assert time.perf_counter() - began < 0.05


def test_the_run_gets_the_gil_back_quickly_while_the_warmup_runs_python():
    """The warm-up's Python holds the GIL; the run (tokenizing, downloading) releases it in every
    native call and must not wait the default 5 ms to get it back each time (device_warmup.py)."""
    default = sys.getswitchinterval()
    seen, stop, running = [], threading.Event(), threading.Event()

    def python_work():  # as transformers' rules and bitsandbytes' import: pure Python, no release
        seen.append(sys.getswitchinterval())
        running.set()
        x = 0
        while not stop.is_set():
            x += 1

    warmup = DeviceWarmup(python_work)
    running.wait(5)
    began = time.perf_counter()
    for _ in range(8):
        time.sleep(0.001)  # a native call that releases the GIL, then wants it back
    waited = time.perf_counter() - began
    stop.set()
    warmup.wait()
    assert seen == [min(default, 0.0005)]
    assert sys.getswitchinterval() == default  # the process's own interval once the warm-up ends
    assert waited < 8 * (0.001 + default) - 0.004  # not a switch interval per return (0.048 s at 5 ms)
