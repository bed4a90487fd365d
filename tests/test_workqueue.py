"""The reconcile work queue and a new job's first reconcile: what keeps a burst of a thousand
creations (and their children's events) from queueing work behind itself."""

import threading
import time

from qlora_operator.reconcile import Reconciler
from qlora_operator.settings import OperatorSettings
from qlora_operator.workqueue import WorkQueue
from support.fake_kube import FakeKube
from support.objects import qlorajob_body


def test_a_key_waiting_in_the_queue_is_reconciled_once_however_often_it_is_added():
    started, release, done = threading.Event(), threading.Event(), []

    def reconcile(namespace, name):
        if name == "blocker":
            started.set()
            release.wait(5)
        done.append(name)

    queue = WorkQueue(reconcile, workers=1)
    queue.start()
    queue.add("ml", "blocker")
    assert started.wait(5)
    for _ in range(5):  # a burst of child events while the only worker is busy
        queue.add("ml", "a")
    queue.add("ml", "b")
    assert len(queue) == 2
    release.set()
    queue.add("ml", "blocker")  # waiting again (its first run has left the queue): once more, last
    deadline = time.monotonic() + 5
    while len(done) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    queue.stop(timeout=5)
    assert done == ["blocker", "a", "b", "blocker"]


def test_the_first_reconcile_of_a_new_job_reads_nothing_and_creates_its_children():
    kube = FakeKube()
    body = qlorajob_body()
    kube.add_qlorajob(body)
    reconciler = Reconciler(kube, OperatorSettings(retry_delay=0))
    assert reconciler.reconcile_new(body)
    assert kube.reads == []
    assert ("Create", "ConfigMap", "demo-1-config") in kube.writes and ("Create", "Job", "demo-1") in kube.writes
    assert kube.writes[0] == ("PatchStatus", "QLoRAJob", "demo")  # the status first: it marks the job as seen


def test_a_job_already_reconciled_or_changed_since_its_event_goes_the_usual_way():
    kube = FakeKube()
    body = qlorajob_body()
    kube.add_qlorajob(body)
    reconciler = Reconciler(kube, OperatorSettings(retry_delay=0))
    reconciler.reconcile("ml", "demo")  # it has a status with conditions now
    writes = list(kube.writes)
    assert not reconciler.reconcile_new(kube.get_qlorajob("ml", "demo"))
    assert not reconciler.reconcile_new(body)  # the create event's body: its resourceVersion is stale
    assert kube.writes == writes
