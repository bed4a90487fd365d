"""The resync is a safety net whose cost does not grow with the settled jobs: one snapshot (a LIST
per kind) per interval, a log read per running trainer, and a fresh reconcile only for a job the
snapshot shows would change. Measured at scale by benchmarks/thousand_jobs.py."""

from qlora_operator.reconcile import Reconciler
from qlora_operator.resync import Resync
from qlora_operator.settings import OperatorSettings
from support.fake_kube import FakeKube
from support.objects import pod, qlorajob_body, running

SETTINGS = OperatorSettings(retry_delay=0)
JOBS = 30


def settled_jobs():
    """JOBS QLoRAJobs, each reconciled until a reconcile writes nothing (its Job created, its
    status Pending with attempts=1)."""
    kube = FakeKube()
    reconciler = Reconciler(kube, SETTINGS)
    for i in range(JOBS):
        kube.add_qlorajob(qlorajob_body(name=f"job-{i}", uid=f"00000000-0000-4000-8000-{i:012d}"))
        for _ in range(3):
            reconciler.reconcile("ml", f"job-{i}")
    queued: list[str] = []
    resync = Resync(kube, reconciler, ("ml",), 5.0, enqueue=lambda namespace, name: queued.append(name))
    kube.reads.clear()
    return kube, resync, queued


def test_settled_jobs_cost_one_snapshot_and_no_reconcile():
    kube, resync, queued = settled_jobs()
    writes = len(kube.writes)
    assert resync.run_once() == (JOBS, 0)
    assert kube.reads == ["snapshot"]  # no GET, no per-job LIST, no log (no trainer runs)
    assert queued == [] and len(kube.writes) == writes


def test_only_the_job_whose_children_changed_is_queued():
    kube, resync, queued = settled_jobs()
    del kube.objects[("Job", "job-7-1")]  # deleted by hand: its QLoRAJob must notice
    assert resync.run_once() == (JOBS, 1)
    assert queued == ["job-7"]


def test_a_started_trainer_costs_one_log_read_and_its_new_state_queues_the_job():
    kube, resync, queued = settled_jobs()
    trainer = kube.objects[("Job", "job-3-1")]
    started = pod(trainer, phase="Running", state=running())
    kube.objects[("Pod", started["metadata"]["name"])] = started
    kube.logs[started["metadata"]["name"]] = '{"event": "progress", "step": 4, "totalSteps": 10, "loss": 1.5}\n'
    assert resync.run_once() == (JOBS, 1)
    assert kube.reads == ["snapshot", "log"] and queued == ["job-3"]
