"""The GPU warm-up thread (device_warmup.py): the quantize phase waits only for what is left of it,
and a warm-up that fails never fails the run by itself (the model load reports the real error)."""

import logging
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
