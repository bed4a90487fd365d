"""A reconcile run twice in a row does nothing the second time; replays and restarts are harmless."""

import copy

from qlora_api import ConditionType, Reason
from qlora_operator import timestamps
from qlora_operator.reconcile import Reconciler
from qlora_operator.resource import QLoRAJob
from qlora_operator.settings import OperatorSettings
from support.fake_kube import FakeKube
from support.objects import pod, qlorajob_body, result_message, running, terminated, trainer_job

SETTINGS = OperatorSettings(retry_delay=0)


def setup(spec=None):
    kube = FakeKube()
    kube.add_qlorajob(qlorajob_body(spec=spec))
    return kube, Reconciler(kube, SETTINGS)


def status_of(kube):
    return kube.qlorajobs["demo"]["status"]


def condition(kube, ctype):
    return next(c for c in status_of(kube)["conditions"] if c["type"] == ctype)


def test_the_second_reconcile_of_a_new_job_writes_nothing():
    kube, reconciler = setup()
    reconciler.reconcile("ml", "demo")
    first_writes, first_events = list(kube.writes), list(kube.events)
    assert ("Create", "Job", "demo-1") in first_writes and ("Create", "ConfigMap", "demo-1-config") in first_writes
    assert Reason.JOB_CREATED in [e.reason for e in first_events]

    reconciler.reconcile("ml", "demo")
    # The Job now exists, so the status learns attempts=1 once; a third pass must be silent.
    reconciler.reconcile("ml", "demo")
    before = (len(kube.writes), len(kube.events))
    reconciler.reconcile("ml", "demo")
    assert (len(kube.writes), len(kube.events)) == before
    assert [w for w in kube.writes if w[0] == "Create"] == [("Create", "ConfigMap", "demo-1-config"),
                                                            ("Create", "Job", "demo-1")]


def _job(kube):
    return QLoRAJob.from_body(kube.qlorajobs["demo"])


def _play_pod(kube, **pod_kwargs):
    """The Job controller and the kubelet: one pod for demo-1 in the given state."""
    tj = kube.objects[("Job", "demo-1")]
    p = pod(tj, **pod_kwargs)
    kube.objects[("Pod", p["metadata"]["name"])] = p
    return p


def test_a_running_trainer_is_reported_once_and_then_left_alone():
    kube, reconciler = setup()
    reconciler.reconcile("ml", "demo")
    p = _play_pod(kube, phase="Running", state=running())
    kube.logs[p["metadata"]["name"]] = 'loading\n{"event": "progress", "step": 3, "totalSteps": 10, "loss": 2.5}\n'
    reconciler.reconcile("ml", "demo")
    assert status_of(kube)["phase"] == "Running"
    assert status_of(kube)["progress"]["summary"] == "3/10 (30%)"
    writes, events = len(kube.writes), len(kube.events)
    reconciler.reconcile("ml", "demo")
    Reconciler(kube, SETTINGS).reconcile("ml", "demo")  # a restarted operator: no memory of its own
    assert (len(kube.writes), len(kube.events)) == (writes, events)


def test_new_progress_is_written_but_is_not_an_event():
    kube, reconciler = setup()
    reconciler.reconcile("ml", "demo")
    p = _play_pod(kube, phase="Running", state=running())
    kube.logs[p["metadata"]["name"]] = '{"event": "progress", "step": 3, "totalSteps": 10}\n'
    reconciler.reconcile("ml", "demo")
    events = len(kube.events)
    kube.logs[p["metadata"]["name"]] += '{"event": "progress", "step": 4, "totalSteps": 10}\n'
    reconciler.reconcile("ml", "demo")
    assert status_of(kube)["progress"]["step"] == 4
    assert len(kube.events) == events


def test_success_then_ttl_deletion_keeps_the_result():
    kube, reconciler = setup(spec={"ttlSecondsAfterFinished": 0})
    reconciler.reconcile("ml", "demo")
    tj = kube.objects[("Job", "demo-1")]
    _play_pod(kube, phase="Succeeded", state=terminated(0, result_message("s3://adapters/r/")))
    tj["status"] = trainer_job(_job(kube), finished="Complete")["status"]
    reconciler.reconcile("ml", "demo")
    assert condition(kube, ConditionType.SUCCEEDED)["status"] == "True"
    assert tj["spec"]["ttlSecondsAfterFinished"] == 0  # set only after the status held the result
    kube.objects.clear()  # the TTL controller deleted the Job and the GC its pods
    writes = len(kube.writes)
    reconciler.reconcile("ml", "demo")
    assert len(kube.writes) == writes
    assert status_of(kube)["result"]["adapterUri"] == "s3://adapters/r/"


def test_a_stale_read_is_never_written_back():
    kube, reconciler = setup()
    kube.stale_reads = 1
    reconciler.reconcile("ml", "demo")  # the first derivation conflicts, the fresh one is written
    assert status_of(kube)["conditions"]
    assert [w for w in kube.writes if w[0] == "PatchStatus"] == [("PatchStatus", "QLoRAJob", "demo")]


def test_a_replayed_create_after_a_crash_does_not_make_a_second_job():
    kube, reconciler = setup()
    reconciler.reconcile("ml", "demo")
    snapshot = copy.deepcopy(kube.qlorajobs["demo"])
    kube.qlorajobs["demo"] = snapshot  # as if the status write had been lost with the operator
    kube.qlorajobs["demo"].pop("status", None)
    Reconciler(kube, SETTINGS).reconcile("ml", "demo")
    jobs = [k for k in kube.objects if k[0] == "Job"]
    assert jobs == [("Job", "demo-1")]
    assert status_of(kube)["attempts"] == 1


def test_lasttransitiontime_is_whole_seconds_in_utc():
    kube, reconciler = setup()
    reconciler.reconcile("ml", "demo")
    stamp = condition(kube, ConditionType.ACCEPTED)["lastTransitionTime"]
    assert stamp.endswith("Z") and "." not in stamp
    assert timestamps.parse(stamp) is not None
