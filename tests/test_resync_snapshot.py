"""The resync is a safety net whose cost does not grow with the settled jobs: one snapshot (a LIST
per kind) per interval, a log read per running trainer, and a fresh reconcile only for a job the
snapshot shows would change. Measured at scale by benchmarks/thousand_jobs.py."""

from qlora_operator.reconcile import Reconciler
from qlora_operator.resource import QLoRAJob
from qlora_operator.resync import Resync
from qlora_operator.settings import OperatorSettings
from support.fake_kube import FakeKube
from support.objects import pod, qlorajob_body, result_message, running, terminated, trainer_job

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


def finished_jobs():
    """settled_jobs(), every one of them then Succeeded (pod exit 0 with a result, Job Complete) and
    reconciled until settled; returns the resync and a list that records each job it derived."""
    kube, resync, queued = settled_jobs()
    reconciler = resync.reconciler
    for i in range(JOBS):
        trainer = kube.objects[("Job", f"job-{i}-1")]
        done = pod(trainer, suffix=f"p{i}", phase="Succeeded", state=terminated(0, result_message("s3://a/r/")))
        kube.objects[("Pod", done["metadata"]["name"])] = done
        trainer["status"] = trainer_job(QLoRAJob.from_body(kube.qlorajobs[f"job-{i}"]), finished="Complete")["status"]
        trainer["metadata"]["resourceVersion"] = str(next(kube._rv))
        for _ in range(3):
            reconciler.reconcile("ml", f"job-{i}")
        assert kube.qlorajobs[f"job-{i}"]["status"]["phase"] == "Succeeded"
    derived: list[str] = []
    is_settled = reconciler.is_settled

    def counting(body, snapshot):
        derived.append(body["metadata"]["name"])
        return is_settled(body, snapshot)

    reconciler.is_settled = counting
    return kube, resync, queued, derived


def test_finished_jobs_are_derived_once_and_then_skipped_while_nothing_of_theirs_changes():
    kube, resync, queued, derived = finished_jobs()
    assert resync.run_once() == (JOBS, 0)
    assert len(derived) == JOBS  # the first tick checks each one in full
    assert resync.run_once() == (JOBS, 0) and resync.run_once() == (JOBS, 0)
    assert len(derived) == JOBS and queued == []  # later ticks skip them: no parse, no derivation


def test_a_finished_job_is_checked_again_when_it_or_its_job_changes():
    kube, resync, queued, derived = finished_jobs()
    resync.run_once()
    derived.clear()
    del kube.objects[("Job", "job-4-1")]  # the TTL controller deleted it: settled still, but checked
    kube.qlorajobs["job-9"]["metadata"]["resourceVersion"] = str(next(kube._rv))  # e.g. a label edited
    trainer = kube.objects[("Job", "job-2-1")]
    trainer["spec"].pop("ttlSecondsAfterFinished", None)
    trainer["metadata"]["resourceVersion"] = str(next(kube._rv))
    assert resync.run_once() == (JOBS, 0)
    assert sorted(derived) == ["job-2", "job-4", "job-9"]


def test_a_finished_job_whose_job_lost_its_ttl_is_queued_to_set_it_again():
    kube, resync, queued, derived = finished_jobs()
    for i in range(JOBS):  # with a TTL in the spec, the operator puts it on the finished Job
        kube.qlorajobs[f"job-{i}"]["spec"]["ttlSecondsAfterFinished"] = 60
        kube.qlorajobs[f"job-{i}"]["metadata"]["resourceVersion"] = str(next(kube._rv))
    assert resync.run_once() == (JOBS, JOBS)
    for i in range(JOBS):
        resync.reconciler.reconcile("ml", f"job-{i}")
    assert resync.run_once() == (JOBS, 0)
    trainer = kube.objects[("Job", "job-5-1")]
    assert trainer["spec"]["ttlSecondsAfterFinished"] == 60
    trainer["spec"]["ttlSecondsAfterFinished"] = None  # edited away by hand
    trainer["metadata"]["resourceVersion"] = str(next(kube._rv))
    queued.clear()
    assert resync.run_once() == (JOBS, 1) and queued == ["job-5"]
