"""Waiting on a live cluster: a check polled until it holds, and a QLoRAJob's status as kubectl
reads it. On a timeout the failure names what was awaited, the check's last value and whatever
`explain` adds (the operator's log, the job's status)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from qlora_localcluster.testing import kubectl


def wait_for(what: str, check: Callable[[], Any], timeout: float = 60.0, *, every: float = 0.3,
             explain: Callable[[], str] | None = None) -> Any:
    """check() until it returns something truthy, which is returned."""
    deadline = time.monotonic() + timeout
    while True:
        last = check()
        if last:
            return last
        if time.monotonic() >= deadline:
            raise AssertionError(f"no {what} after {timeout:g} s; last: {last!r}" + (f"\n{explain()}" if explain else ""))
        time.sleep(every)


def operator_log(operator) -> Callable[[], str]:
    """An `explain` for wait_for: the tail of an operator process's log (OperatorProcess, Supervised)."""
    return lambda: f"operator log:\n{operator.log_tail()}"


def qlorajob_status(cluster, namespace: str, name: str) -> dict:
    """The QLoRAJob's status ({} before the operator writes one); kubectl fails if it does not exist."""
    out = kubectl(cluster, "-n", namespace, "get", "qlorajob", name, "-o", "json").stdout
    return json.loads(out).get("status") or {}
