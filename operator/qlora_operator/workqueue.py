"""The reconcile work queue: every trigger (a QLoRAJob created, changed or resumed, an event of one
of its Jobs or pods, the resync finding it unsettled) adds the job's key; a fixed pool of worker
threads reconciles the keys in order of arrival.

Why a queue and not a reconcile inside each kopf handler: a job's life brings a dozen child events
(its Job's and pod's every status change), and a handler that reconciles holds one of kopf's threads
through a GET, three LISTs and the writes. With a thousand QLoRAJobs created at once, those
handlers queued behind each other in kopf's pool, and a new job waited for its Job behind the
child events of the jobs before it. Here a key waiting in the queue is not added twice, so a burst
of events for one job costs one reconcile, and a kopf handler returns at once. (controller-runtime's
workqueue does the same; the Reconciler's gate still keeps one reconcile per job at a time.)

A reconcile that raises is logged and not retried here: the resync finds the job unsettled within
one interval and queues it again.
"""

import collections
import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


class WorkQueue:
    def __init__(self, reconcile: Callable[[str, str], None], workers: int):
        self.reconcile, self.workers = reconcile, workers
        self._ready = threading.Condition()
        self._order: collections.deque[tuple[str, str]] = collections.deque()
        self._waiting: set[tuple[str, str]] = set()
        self._threads: list[threading.Thread] = []
        self._stopping = False

    def add(self, namespace: str, name: str) -> None:
        key = (namespace, name)
        with self._ready:
            if key in self._waiting:
                return  # the reconcile still to come will see this change too
            self._waiting.add(key)
            self._order.append(key)
            self._ready.notify()

    def __len__(self) -> int:
        with self._ready:
            return len(self._order)

    def start(self) -> None:
        for i in range(self.workers):
            thread = threading.Thread(target=self._work, name=f"qlora-reconcile-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float = 30) -> None:
        with self._ready:
            self._stopping = True
            self._ready.notify_all()
        for thread in self._threads:
            thread.join(timeout)

    def _work(self) -> None:
        while True:
            with self._ready:
                while not self._order and not self._stopping:
                    self._ready.wait()
                if self._stopping:
                    return
                key = self._order.popleft()
                self._waiting.discard(key)  # a change from now on needs a reconcile after this one
            try:
                self.reconcile(*key)
            except Exception:  # counted by the reconciler; the resync brings the job back
                log.exception("reconcile of %s/%s failed", *key)
