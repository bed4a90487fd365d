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

# test file -> seconds of its tests together, from the suite's own --durations report (4 workers on
# 2 cores under a load average of 8-17 from other work, so about twice an idle machine's); files
# under a minute there are left out.
SECONDS: dict[str, float] = {
    "test_promise_grace_checkpoint.py": 1030,
    "test_acceleration.py": 650,
    "test_promise_store_flaps.py": 530,
    "test_promise_preemption.py": 440,
    "test_trainer_sharded.py": 370,
    "test_operator_integration.py": 330,
    "test_trainer_errors.py": 330,
    "test_malformed_datasets.py": 280,
    "test_promise_api_outage.py": 260,
    "test_operator_chaos.py": 240,
    "test_trainer_e2e.py": 240,
    "test_kueue.py": 230,
    "test_trainer_pretrained_sample.py": 200,
    "test_trainer_data_parallel.py": 190,
    "test_image_build.py": 180,
    "test_end_to_end.py": 165,
    "test_cli_trained_adapter.py": 150,
    "test_trainer_resume.py": 150,
    "test_promise_deletion.py": 140,
    "test_data_parallel_cluster.py": 140,
    "test_trainer_image_user.py": 130,
    "test_operator_image.py": 120,
    "test_sharded_plan.py": 120,
    "test_cli.py": 100,
    "test_helm_lifecycle.py": 100,
    "test_failure_reasons_cluster.py": 100,
    "test_operator_scale.py": 95,
    "test_hostile_qlorajobs.py": 90,
    "test_cli_fetch_serve.py": 90,
    "test_gitops_health.py": 80,
}
LONG_S = 200.0  # a file at least this long is one a worker should not have two of in a row


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
