"""How `make test` shares the suite among pytest-xdist workers: one test file at a time per worker
(a file's module-scoped fixtures, such as a private cluster, exist once, and tests that build on
each other stay in order), the longest files first.

Most of the suite's time is a few files that wait for minutes (grace periods, outages, a trainer on
the CPU inside a private cluster). Given out in plain order they could start last and run alone at
the end; so they start first, each on a worker of its own, and the short files fill the gaps. A
worker that is busy with a long file is given a short one next (xdist hands a worker its next file
while it still has tests left, and the worker cannot run its last test before it knows what comes
after it), so two long files never queue on one worker while short ones remain.

SECONDS is measured (`--durations` in CI's log, 2 cores): update it when a file's time changes a
lot. A file not listed counts as short and keeps its collection order."""

from __future__ import annotations

from pathlib import PurePosixPath

from xdist.scheduler import LoadFileScheduling

# test file -> seconds of its tests together on 2 cores, from the suite's own --durations report
SECONDS: dict[str, float] = {
    "test_promise_preemption.py": 300,
    "test_promise_api_outage.py": 240,
    "test_promise_grace_checkpoint.py": 240,
    "test_promise_deletion.py": 150,
    "test_promise_store_flaps.py": 150,
    "test_trainer_sharded.py": 106,
    "test_operator_scale.py": 95,
}
LONG_S = 60.0  # a file at least this long is one a worker should not have two of in a row


def seconds(scope: str) -> float:
    return SECONDS.get(PurePosixPath(scope.split("::", 1)[0]).name, 0.0)


class LongestFileFirst(LoadFileScheduling):
    _ordered = False

    def _assign_work_unit(self, node) -> None:
        if not self._ordered:  # the queue as xdist built it, longest file first (sort is stable)
            for scope in sorted(self.workqueue, key=seconds, reverse=True):
                self.workqueue.move_to_end(scope)
            self._ordered = True
        busy_with_long = any(seconds(scope) >= LONG_S and not all(tests.values())
                             for scope, tests in self.assigned_work.get(node, {}).items())
        if busy_with_long:
            short = next((scope for scope in self.workqueue if seconds(scope) < LONG_S), None)
            if short is not None:
                self.workqueue.move_to_end(short, last=False)  # the unit super() takes next
        super()._assign_work_unit(node)
