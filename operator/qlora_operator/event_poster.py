"""Events posted by a few background threads, not by the reconcile that records them.

An Event is one more round trip to the API server, and the status already says what the Event
says. With a thousand QLoRAJobs created at once, the two Events of each first reconcile (Accepted,
JobCreated) doubled the time each new job held a handler thread. As client-go's event broadcaster
does, Events wait in a bounded queue and are dropped (with a warning) when it is full: they are
best effort, the status and the trainer Jobs are not.
"""

import logging
import queue
import threading
from collections.abc import Callable
from datetime import datetime

from qlora_operator.derivation import OperatorEvent
from qlora_operator.resource import QLoRAJob

log = logging.getLogger(__name__)


class EventPoster:
    def __init__(self, post: Callable[[QLoRAJob, OperatorEvent, datetime], None], threads: int = 4,
                 capacity: int = 4096):
        self.post = post
        self._queue: queue.Queue = queue.Queue(maxsize=capacity)
        self._dropped = 0
        for i in range(threads):
            threading.Thread(target=self._work, name=f"qlora-events-{i}", daemon=True).start()

    def __call__(self, job: QLoRAJob, event: OperatorEvent, now: datetime) -> None:
        try:
            self._queue.put_nowait((job, event, now))
        except queue.Full:
            self._dropped += 1
            if self._dropped % 100 == 1:
                log.warning("the API server is not keeping up with Events: %d dropped so far (%s on %s)",
                            self._dropped, event.reason, job.key)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every queued Event has been posted (True), or the timeout passes (False)."""
        done = threading.Event()
        threading.Thread(target=lambda: (self._queue.join(), done.set()), daemon=True).start()
        return done.wait(timeout)

    def _work(self) -> None:
        while True:
            job, event, now = self._queue.get()
            try:
                self.post(job, event, now)
            except Exception:  # post_event already swallows API errors; anything else must not kill the thread
                log.exception("posting event %s on %s failed", event.reason, job.key)
            finally:
                self._queue.task_done()
