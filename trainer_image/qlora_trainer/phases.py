"""Where a run's time goes outside training: one timer for every phase (download, quantize, tokenize,
evaluation, checkpoint upload, publish).

    clock = PhaseClock(reporter)
    with clock.phase("downloadModel") as phase:
        files = fetch_model(...)
        phase.bytes = folder_bytes(files.path)      # quantities known only at the end are set inside

Each phase, as it ends, logs one line and prints one `{"event": "phase", ...}` line on stdout
(TrainerPhaseLine); `summary()` is the `phases` section of the published training_config.json.
A phase that runs inside another (checkpointUpload inside train) is marked `inside` and is not
counted again in the top-level sum, so the top-level phases add up to the run's wall time.
A phase that runs several times (checkpointUpload, evalDuring) is summed, with its `count`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from qlora_api import TrainerPhaseLine

log = logging.getLogger("qlora_trainer")

MB = 1e6


@dataclass
class Phase:
    """One timed phase; the quantities are optional and give the rates of the report."""

    name: str
    inside: str | None = None
    seconds: float = 0.0
    bytes: int | None = None
    params: int | None = None
    tokens: int | None = None
    rows: int | None = None

    def line(self) -> TrainerPhaseLine:
        def rate(quantity, scale=1.0, digits=1):
            return round(quantity / scale / self.seconds, digits) if quantity is not None and self.seconds > 0 else None

        return TrainerPhaseLine(
            phase=self.name, seconds=round(self.seconds, 6), inside=self.inside,
            bytes=self.bytes, megabytes_per_second=rate(self.bytes, MB, 2),
            params=self.params, params_per_second=rate(self.params),
            tokens=self.tokens, tokens_per_second=rate(self.tokens), rows=self.rows,
        )

    def describe(self) -> str:
        line = self.line()
        parts = [f"{self.seconds:.2f} s"]
        if line.bytes is not None:
            parts.append(f"{line.bytes / MB:.1f} MB" + (f" at {line.megabytes_per_second} MB/s"
                                                       if line.megabytes_per_second is not None else ""))
        if line.params is not None:
            parts.append(f"{line.params / 1e6:.1f}M params" + (f" at {line.params_per_second / 1e6:.1f}M/s"
                                                              if line.params_per_second else ""))
        if line.tokens is not None:
            parts.append(f"{line.tokens} tokens" + (f" at {line.tokens_per_second:.0f}/s"
                                                    if line.tokens_per_second else ""))
        if line.rows is not None:
            parts.append(f"{line.rows} rows")
        return ", ".join(parts)


class PhaseClock:
    """Times the run's phases (a context manager per phase) and reports each as it ends."""

    def __init__(self, reporter=None, start: float | None = None):
        self.reporter = reporter  # a ProgressReporter (stdout), or None: the log line only
        self.start = time.monotonic() if start is None else start
        self.done: list[Phase] = []
        self._open: list[Phase] = []

    @contextmanager
    def phase(self, name: str) -> Iterator[Phase]:
        current = Phase(name, inside=self._open[-1].name if self._open else None)
        self._open.append(current)
        began = time.monotonic()
        try:
            yield current
        finally:
            current.seconds = time.monotonic() - began
            self._open.remove(current)
            self.done.append(current)
            log.info("phase %s%s: %s", name, f" (inside {current.inside})" if current.inside else "",
                     current.describe())
            if self.reporter is not None:
                self.reporter.report(current.line())

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def summary(self) -> dict:
        """The `phases` section of training_config.json: seconds (and quantities, rates) per phase,
        repeated phases summed with their count, and the wall time they account for."""
        merged: dict[str, Phase] = {}
        counts: dict[str, int] = {}
        for p in self.done:
            counts[p.name] = counts.get(p.name, 0) + 1
            if p.name not in merged:
                merged[p.name] = Phase(p.name, p.inside)
            m = merged[p.name]
            m.seconds += p.seconds
            for quantity in ("bytes", "params", "tokens", "rows"):
                value = getattr(p, quantity)
                if value is not None:
                    setattr(m, quantity, (getattr(m, quantity) or 0) + value)
        phases = {}
        for name, m in merged.items():
            entry = m.line().model_dump(by_alias=True, exclude_none=True, exclude={"event", "phase"})
            if counts[name] > 1:
                entry["count"] = counts[name]
            phases[name] = entry
        top = sum(p.seconds for p in self.done if p.inside is None)
        return {
            "order": list(merged),  # as they ran (the file is written with sorted keys)
            "byPhase": phases,
            "topLevelSeconds": round(top, 6),
            # The same rounding as topLevelSeconds: at 3 digits the wall time could round below it.
            "wallSeconds": round(self.elapsed(), 6),
        }


def folder_bytes(path: Path) -> int:
    """Bytes of the files under a folder (links followed: an hf:// snapshot links into its blobs)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
