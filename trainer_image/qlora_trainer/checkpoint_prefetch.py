"""A safetensors checkpoint read and placed on the device by a background thread, a bounded way ahead.

With on-the-fly 4-bit quantization transformers loads tensor by tensor on the main thread: for
each parameter its own Python (renaming, dtype plan, module lookup, the quantize call) and then the
tensor's read and pageable host-to-device copy, all in series. The copies release the GIL, so a
thread that reads and places the next tensors while the main thread does that Python takes the
copies off the critical path. The thread walks the keys in the order transformers asks for them
(its `dot_natural_key` sort) and places each with a pageable `.to(device)` on the thread's current
stream, the device's default stream, the same one the quantizations run on: no events needed.

`PrefetchedCheckpoint.state_dict()` gives lazy values (what `value[...]` returns is the tensor, as
transformers' own safetensors slices) for `from_pretrained(None, config=..., state_dict=...)`.
A value asked for before the thread got to it, or out of order while the thread waits for room, is
read by the asking thread itself, so nothing waits on a full buffer. An error in the thread is
raised by the next value asked for; `close()` stops the thread and waits for it.
"""

import json
import threading
from pathlib import Path

import torch
from safetensors import safe_open

from qlora_trainer.errors import model_not_found

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
DEFAULT_BOUND_BYTES = 1 << 30  # ~1 GB of placed tensors not yet taken by transformers


def checkpoint_shards(folder: Path) -> dict[str, Path] | None:
    """Each tensor's shard file, from the index (several shards) or the single model.safetensors;
    None when the folder holds neither (another format: the caller keeps transformers' folder load)."""
    index = folder / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as exc:
            raise model_not_found(f"{index.name} in the model folder is not a safetensors index ({exc}); "
                                  "re-save the model") from exc
        return {key: folder / name for key, name in weight_map.items()}
    single = folder / SINGLE_NAME
    if single.is_file():
        with _open(single) as f:
            return dict.fromkeys(f.keys(), single)
    return None


def _open(path: Path):
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as exc:  # missing file, bad header, truncated: safetensors' own error types vary
        raise model_not_found(f"model weights {path.name}: cannot be read as safetensors ({exc}); "
                              "re-upload the model's files") from exc


def _natural_order(keys):
    """transformers' own load order; its sort key lives in a module that is not public API."""
    from transformers.core_model_loading import dot_natural_key

    return sorted(keys, key=dot_natural_key)


class _Lazy:
    """What transformers' loader calls `[...]` on to get the tensor."""

    __slots__ = ("_owner", "_key")

    def __init__(self, owner: "PrefetchedCheckpoint", key: str):
        self._owner, self._key = owner, key

    def __getitem__(self, index):
        if index is not Ellipsis:
            raise TypeError("prefetched checkpoint values are read whole (value[...])")
        return self._owner.take(self._key)


class PrefetchedCheckpoint:
    def __init__(self, shards: dict[str, Path], device: torch.device | str,
                 bound_bytes: int = DEFAULT_BOUND_BYTES):
        self.device = torch.device(device)
        self.bound_bytes = bound_bytes
        self._key_file = shards
        self._files = {path: _open(path) for path in sorted(set(shards.values()))}  # a bad shard fails here
        self._order = _natural_order(shards)
        self._cond = threading.Condition()
        self._ready: dict[str, torch.Tensor] = {}
        self._in_flight: str | None = None
        self._claimed: set[str] = set()  # taken by the thread, or read by the asker itself
        self._outstanding = 0  # bytes placed or being placed, not yet taken
        self.peak_outstanding = 0
        self.prefetched = 0  # tensors the thread placed that were then taken
        self._waiting_for_room = False
        self._error: BaseException | None = None
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="checkpoint-prefetch", daemon=True)
        self._thread.start()

    def state_dict(self) -> dict[str, _Lazy]:
        return {key: _Lazy(self, key) for key in self._order}

    def _slice(self, key: str, read: bool = False):
        path = self._key_file[key]
        try:
            sl = self._files[path].get_slice(key)
            return sl[...] if read else sl
        except Exception as exc:
            raise model_not_found(f"model weights {path.name}: tensor {key} cannot be read ({exc}); "
                                  "re-upload the model's files") from exc

    def _read(self, key: str) -> torch.Tensor:
        return self._slice(key, read=True).to(self.device)

    def _size(self, key: str) -> int:
        sl = self._slice(key)
        n = 1
        for d in sl.get_shape():
            n *= d
        return n * _DTYPE_BYTES.get(sl.get_dtype(), 4)

    def _run(self) -> None:
        try:
            for key in self._order:
                size = self._size(key)
                with self._cond:
                    # Room for it, or nothing outstanding (a tensor larger than the bound still goes).
                    while not self._stop and self._outstanding and self._outstanding + size > self.bound_bytes:
                        self._waiting_for_room = True
                        self._cond.notify_all()  # an asker waiting on a later key reads it itself
                        self._cond.wait()
                    self._waiting_for_room = False
                    if self._stop:
                        return
                    if key in self._claimed:
                        continue
                    self._claimed.add(key)
                    self._in_flight = key
                    self._outstanding += size
                    self.peak_outstanding = max(self.peak_outstanding, self._outstanding)
                tensor = self._read(key)
                with self._cond:
                    self._ready[key] = tensor
                    self._in_flight = None
                    self._cond.notify_all()
        except BaseException as exc:  # surfaced by take(): a load must fail, not hang
            with self._cond:
                self._error = exc
                self._in_flight = None
                self._cond.notify_all()

    def take(self, key: str) -> torch.Tensor:
        with self._cond:
            while True:
                if key in self._ready:
                    tensor = self._ready.pop(key)
                    self._outstanding -= tensor.numel() * tensor.element_size()
                    self.prefetched += 1
                    self._cond.notify_all()
                    return tensor
                if self._error is not None:
                    raise self._error
                if key not in self._claimed and (self._waiting_for_room or self._stop
                                                 or not self._thread.is_alive()):
                    # Not started by the thread, which waits for room this asker would have to make
                    # (an unused or out-of-order key holds it) or has stopped: read it here.
                    self._claimed.add(key)
                    break
                self._cond.wait()
        return self._read(key)

    def close(self) -> None:
        """Stop the thread and wait for it (it finishes at most the tensor it is placing)."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join()
        self._ready.clear()
        self._files.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


_DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
                "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
