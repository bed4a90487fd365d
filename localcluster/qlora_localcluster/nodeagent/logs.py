"""Container log files in the CRI format kubelet reads, and the reader behind `kubectl logs`.

One file per container start: `<pod dir>/logs/<container>/<restartCount>.log`, each line
`<RFC3339 timestamp> <stdout|stderr> <F|P> <text>` (P: a partial line continued by the next
entry), so timestamps, sinceSeconds and previous work as they do against a kubelet.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

MAX_LINE = 16 * 1024


def now_rfc3339() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(text: str) -> dt.datetime:
    text = text.replace("Z", "+00:00")
    if "." in text:  # nanoseconds do not fit datetime: keep six digits
        head, _, rest = text.partition(".")
        n = len(rest) - len(rest.lstrip("0123456789"))
        text = f"{head}.{rest[:n][:6].ljust(6, '0')}{rest[n:]}"
    return dt.datetime.fromisoformat(text)


class LogWriter:
    """Copies a process's stdout and stderr pipes into one log file, line by line."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._file = open(path, "ab", buffering=0)
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def attach(self, stream_name: str, pipe: IO[bytes]) -> None:
        t = threading.Thread(
            target=self._copy,
            args=(stream_name, pipe),
            daemon=True,
            name=f"log-{self.path.parent.name}-{stream_name}",
        )
        t.start()
        self._threads.append(t)

    def _copy(self, stream_name: str, pipe: IO[bytes]) -> None:
        try:
            while True:
                chunk = pipe.readline(MAX_LINE)
                if not chunk:
                    break
                partial = not chunk.endswith(b"\n")
                text = chunk[:-1] if not partial else chunk
                record = f"{now_rfc3339()} {stream_name} {'P' if partial else 'F'} ".encode() + text + b"\n"
                with self._lock:
                    if self._file.closed:  # an orphan kept the pipe open past close()
                        break
                    self._file.write(record)
        finally:
            pipe.close()

    def close(self, timeout: float = 5.0) -> None:
        """Waits for the pipes to drain (the process has exited), then closes the file."""
        for t in self._threads:
            t.join(timeout)
        with self._lock:
            self._file.close()


@dataclass
class LogOptions:
    follow: bool = False
    tail_lines: int | None = None
    limit_bytes: int | None = None
    timestamps: bool = False
    since_seconds: int | None = None
    since_time: str | None = None
    previous: bool = False
    cancel: threading.Event | None = None  # set when a follower goes away


def _parse_record(line: bytes) -> tuple[str, bytes, bool] | None:
    try:
        ts, _stream, tag, text = line.rstrip(b"\n").split(b" ", 3)
    except ValueError:
        parts = line.rstrip(b"\n").split(b" ", 3)
        if len(parts) == 3:  # empty text
            ts, _stream, tag, text = *parts, b""
        else:
            return None
    return ts.decode(), text, tag == b"P"


def _render(record: tuple[str, bytes, bool], timestamps: bool) -> bytes:
    ts, text, partial = record
    out = text if partial else text + b"\n"
    return (ts.encode() + b" " + out) if timestamps else out


def read_log(
    path: Path, opts: LogOptions, still_running: Callable[[], bool] = lambda: False, poll: float = 0.2
) -> Iterator[bytes]:
    """Yields the rendered log; with follow, keeps yielding until the container stops running."""
    since = None
    if opts.since_time:
        since = parse_time(opts.since_time)
    elif opts.since_seconds is not None:
        since = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=opts.since_seconds)
    budget = opts.limit_bytes

    def admit(record) -> bool:
        return since is None or parse_time(record[0]) >= since

    def emit(data: bytes) -> tuple[bytes, bool]:
        nonlocal budget
        if budget is None:
            return data, False
        data = data[:budget]
        budget -= len(data)
        return data, budget <= 0

    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return
    with f:
        content = f.read()
        complete_end = content.rfind(b"\n") + 1
        records = [r for r in map(_parse_record, content[:complete_end].splitlines()) if r]
        records = [r for r in records if admit(r)]
        if opts.tail_lines is not None:  # as kubelet: the last N records of the file
            records = records[-opts.tail_lines :] if opts.tail_lines > 0 else []
        for r in records:
            data, done = emit(_render(r, opts.timestamps))
            if data:
                yield data
            if done:
                return
        if not opts.follow:
            return
        f.seek(complete_end)
        pending = b""
        while True:
            running = still_running()  # read before the file, so the last lines are not missed
            chunk = f.read()
            if chunk:
                pending += chunk
                cut = pending.rfind(b"\n") + 1
                for line in pending[:cut].splitlines():
                    r = _parse_record(line)
                    if r and admit(r):
                        data, done = emit(_render(r, opts.timestamps))
                        if data:
                            yield data
                        if done:
                            return
                pending = pending[cut:]
            elif not running or (opts.cancel is not None and opts.cancel.is_set()):
                return
            else:
                time.sleep(poll)
