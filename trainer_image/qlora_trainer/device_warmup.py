"""The GPU's one-off start-up costs, paid on a thread while the run downloads and tokenizes.

A process's first allocation on a GPU creates its CUDA context, bitsandbytes' first launch loads
its quantization kernel, and transformers' first load compiles its checkpoint conversion rules: a
few hundred milliseconds that nothing before the weights load needs, so they used to land inside
the quantize phase (the planner reads the device's properties, which does not create a context). `DeviceWarmup.start` does both on a daemon thread right after
the run starts; the quantize phase waits for it (`wait`, its `deviceWarmup` sub-phase) and then
finds the context and the kernel ready. A warm-up that fails only logs: the model load that follows
meets the same error and reports it as the run's failure.

    warmup = DeviceWarmup.start(world.local_rank)   # a no-op without a GPU
    ...download, tokenize...
    warmup.wait()                                   # seconds the caller waited
"""

from __future__ import annotations

import logging
import sys
import threading
import time

log = logging.getLogger(__name__)

# The GIL's switch interval while the warm-up runs. Its first part is Python (transformers' rules,
# bitsandbytes' import and op registration) holding the GIL; the run meanwhile releases the GIL
# in every native call (the tokenizer's batched pass, S3 reads) and on return waits until the
# holder is asked to let go: up to the default 5 ms each time. On the 8B row the tokenize phase
# ran in the warm-up's last tens of milliseconds (a pvc:// model, no download to hide it behind)
# and took 21 ms against a 10.6 ms floor; a busy Python thread turns ten 1 ms sleeps into 62 ms
# at 5 ms and 17 ms at 0.5 ms. The default comes back when the warm-up ends.
WARMUP_SWITCH_INTERVAL_S = 0.0005


def warm_loader() -> None:
    """transformers' first from_pretrained in a process compiles the regular expressions of every
    architecture's checkpoint conversion mapping (about 1,000 of them, 0.24 s of a 0.35 s tiny-model
    load on a build machine's CPU; 0.04 s the second time): build that cache now. A transformers
    without it (older or newer) has nothing to warm here."""
    try:
        from transformers import conversion_mapping

        conversion_mapping.get_checkpoint_conversion_mapping("llama")
    except (ImportError, AttributeError):
        pass


def warm_device(index: int) -> None:
    """Create the context of GPU `index` and load bitsandbytes' NF4 quantization kernel (with the
    double quantization of the scales, as the loader runs it), then wait for the GPU."""
    import bitsandbytes.functional as bnbf
    import torch

    with torch.cuda.device(index):
        w = torch.ones(64, 64, dtype=torch.bfloat16, device=f"cuda:{index}")
        bnbf.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
        torch.cuda.synchronize(index)


class DeviceWarmup:
    """One warm-up on a daemon thread; `seconds` is how long it ran there (None until it ends)."""

    def __init__(self, work=None):
        self.seconds: float | None = None
        self.error: BaseException | None = None
        self._thread: threading.Thread | None = None
        if work is not None:
            self._thread = threading.Thread(target=self._run, args=(work,), name="device-warmup", daemon=True)
            self._thread.start()

    @classmethod
    def start(cls, index: int | None) -> DeviceWarmup:
        """Warm GPU `index` in the background; nothing to do without a GPU (or index None)."""
        import torch

        if index is None or not torch.cuda.is_available():
            return cls()
        def work():
            warm_loader()  # first: pure Python, while the run waits on the network (storage check, data)
            warm_device(index)

        return cls(work)

    @property
    def active(self) -> bool:
        """Whether there is a warm-up to wait for (a GPU)."""
        return self._thread is not None

    def _run(self, work) -> None:
        began = time.monotonic()
        before = sys.getswitchinterval()
        sys.setswitchinterval(min(before, WARMUP_SWITCH_INTERVAL_S))
        try:
            work()
        except BaseException as exc:  # noqa: BLE001  (the load that follows reports the real failure)
            self.error = exc
            log.warning("device warm-up failed (the model load will meet it again): %s", exc)
        finally:
            if sys.getswitchinterval() == min(before, WARMUP_SWITCH_INTERVAL_S):  # unless changed meanwhile
                sys.setswitchinterval(before)
            self.seconds = time.monotonic() - began

    def wait(self) -> float:
        """Block until the warm-up has ended; the seconds this call waited."""
        began = time.monotonic()
        if self._thread is not None:
            self._thread.join()
            if self.seconds is not None and self.error is None:
                log.info("device warmed up in %.2f s on a thread, %.2f s of it waited for",
                         self.seconds, time.monotonic() - began)
        return time.monotonic() - began
