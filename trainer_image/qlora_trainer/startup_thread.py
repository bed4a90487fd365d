"""The run's one-off start-up costs, paid on a thread while the run checks its storage and
downloads its data.

Importing torch, transformers, peft, trl and bitsandbytes takes seconds (about 18 s in a fresh
process on the GPU benchmark's machine, 10 s of one core on a build machine), and nothing before
the model needs them: the storage check, an earlier attempt's publication and the data's
record-by-record check are boto3 and json. Imported first, as they were, they made every run wait
for them before it could fail on a wrong bucket or a bad record, and a rerun of a published run
paid them to report a result it only reads. Then, on a GPU: a process's first allocation creates
its CUDA context, bitsandbytes' first launch loads its quantization kernel, and transformers' first
load compiles its checkpoint conversion rules, a few hundred milliseconds that nothing before the
weights load needs either.

`StartupThread.start` does all of it on a daemon thread as the run starts: the imports, then the
GPU's warm-up. The run's "startup" phase waits for it after the data is downloaded (`wait`: what
the downloads did not hide), so the phases after it (the model's download, the tokenizer's pass)
run with the GIL to themselves. Nothing fails on the thread: an import or a warm-up that fails
only logs, and the main thread's own import (or the model load) meets the same error and reports
it as the run's failure. A run that fails or finishes before `wait` exits without joining it.

    startup = StartupThread.start(world.local_rank, sft.TRAINING_MODULES)   # the run's first step
    ...check storage, download and check the data...
    startup.wait()                                                     # seconds the caller waited
"""

from __future__ import annotations

import importlib
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


class StartupThread:
    """The start-up work on a daemon thread; `seconds` is how long it ran there (None until it ends)."""

    def __init__(self, work=None):
        self.seconds: float | None = None
        self.error: BaseException | None = None
        self._thread: threading.Thread | None = None
        if work is not None:
            self._thread = threading.Thread(target=self._run, args=(work,), name="startup", daemon=True)
            self._thread.start()

    @classmethod
    def start(cls, index: int | None, imports: tuple[str, ...] = ()) -> StartupThread:
        """Import `imports`, then warm GPU `index` (none without a GPU, or with index None), in the
        background."""
        def work():
            for name in imports:  # a failure stops here: the main thread's import raises it
                importlib.import_module(name)
            import torch

            if index is None or not torch.cuda.is_available():
                return
            warm_loader()
            warm_device(index)

        return cls(work)

    def _run(self, work) -> None:
        began = time.monotonic()
        before = sys.getswitchinterval()
        sys.setswitchinterval(min(before, WARMUP_SWITCH_INTERVAL_S))
        try:
            work()
        except BaseException as exc:  # noqa: BLE001  (the load that follows reports the real failure)
            self.error = exc
            log.warning("start-up work failed on its thread (the run meets it again where it needs it): %s", exc)
        finally:
            if sys.getswitchinterval() == min(before, WARMUP_SWITCH_INTERVAL_S):  # unless changed meanwhile
                sys.setswitchinterval(before)
            self.seconds = time.monotonic() - began

    def wait(self) -> float:
        """Block until the thread's work has ended; the seconds this call waited."""
        began = time.monotonic()
        if self._thread is not None:
            self._thread.join()
            if self.seconds is not None and self.error is None:
                log.info("start-up (imports, device warm-up) took %.2f s on a thread, %.2f s of it waited for",
                         self.seconds, time.monotonic() - began)
        return time.monotonic() - began
