"""Who may change the shared cluster's QLoRAJob CRD, and when.

Every cluster test shares one CRD object (it is cluster-scoped) and expects the working tree's
schema. The Helm lifecycle test must install the previous release's CRD for a few seconds, because
that is what upgrading from the previous release means. A test that meanwhile created a job with a
field only the new schema knows would see kubectl refuse it, or the API server prune it.

So the `namespace` fixture (tests/conftest.py) holds this lock shared for the whole of each cluster
test, and the lifecycle test holds it exclusively while the CRD is not the working tree's. The
lock is a pair of flock(2) files in the cluster's state directory: every process on this machine
that uses the cluster sees them, and the kernel releases them when their holder dies, so a killed
test never leaves the cluster locked. A writer first takes the turnstile, which new readers must
pass, so a steady stream of short tests cannot starve it.

(The demo's operator is not a test and does not take the lock.)"""

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def _flock(path: Path, mode: int, timeout: float, what: str) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"waited {timeout:.0f} s for {what} ({path})") from None
                time.sleep(0.2)
        yield
    finally:
        os.close(fd)  # releases the lock


def _paths(cluster) -> tuple[Path, Path]:
    return cluster.state_dir / "crd-schema.turnstile.lock", cluster.state_dir / "crd-schema.lock"


_held_in_this_process = 0


@contextlib.contextmanager
def schema_in_use(cluster, timeout: float = 900) -> Iterator[None]:
    """Held by a test that relies on the working tree's CRD (shared with every other such test).
    Re-entrant: a fixture inside a test that already holds it must not queue behind a writer that
    is itself waiting for that test."""
    global _held_in_this_process
    if _held_in_this_process:
        _held_in_this_process += 1
        try:
            yield
        finally:
            _held_in_this_process -= 1
        return
    turnstile, lock = _paths(cluster)
    with _flock(turnstile, fcntl.LOCK_EX, timeout, "a CRD schema change to finish"):
        pass  # only passing through: a waiting writer holds it
    with _flock(lock, fcntl.LOCK_SH, timeout, "a CRD schema change to finish"):
        _held_in_this_process = 1
        try:
            yield
        finally:
            _held_in_this_process = 0


@contextlib.contextmanager
def schema_change(cluster, timeout: float = 900) -> Iterator[None]:
    """Held while the CRD is not the working tree's: no other cluster test runs meanwhile."""
    turnstile, lock = _paths(cluster)
    with _flock(turnstile, fcntl.LOCK_EX, timeout, "the turn to change the CRD schema"), \
            _flock(lock, fcntl.LOCK_EX, timeout, "other cluster tests to finish"):
        yield
