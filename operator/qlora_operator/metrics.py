"""Prometheus metrics, served on their own port (QLORA_METRICS_PORT)."""

import threading
from datetime import datetime

from prometheus_client import Counter, Gauge, Histogram, start_http_server

PHASES = ("Pending", "Running", "Suspended", "Succeeded", "Failed")

JOBS = Gauge("qlora_operator_jobs", "QLoRAJobs this operator handles, by phase", ["phase"])
RECONCILE_ERRORS = Counter("qlora_operator_reconcile_errors_total",
                           "Reconciles that raised (they are retried)", ["kind"])
TIME_TO_RUNNING = Histogram("qlora_operator_time_to_running_seconds",
                            "From a QLoRAJob's creation to its trainer first running",
                            buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, float("inf")))
LEADER = Gauge("qlora_operator_leader", "1 while this replica holds the leader Lease (or runs without election)")
TRANSITIONS = Counter("qlora_operator_status_transitions_total", "Events recorded, by reason", ["reason"])


class PhaseBook:
    """The last known phase of every job, so the gauge is a count rather than a running sum."""

    def __init__(self):
        self._phases: dict[str, str] = {}
        self._lock = threading.Lock()
        for phase in PHASES:
            JOBS.labels(phase=phase).set(0)

    def record(self, key: str, phase: str | None) -> None:
        with self._lock:
            self._phases[key] = phase or "Pending"
            self._publish()

    def forget(self, key: str) -> None:
        with self._lock:
            self._phases.pop(key, None)
            self._publish()

    def retain(self, keys: set[str]) -> None:
        """Forget every job not in `keys` (the jobs that still exist)."""
        with self._lock:
            for key in set(self._phases) - keys:
                del self._phases[key]
            self._publish()

    def _publish(self) -> None:
        for phase in PHASES:
            JOBS.labels(phase=phase).set(sum(1 for p in self._phases.values() if p == phase))


def observe_time_to_running(created: datetime, now: datetime) -> None:
    TIME_TO_RUNNING.observe(max(0.0, (now - created).total_seconds()))


def serve(port: int) -> None:
    if port:
        start_http_server(port)
