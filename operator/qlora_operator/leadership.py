"""Run the operator only while this replica leads: stand by (answering /healthz) until the Lease
is ours, lead until a graceful stop releases it, and exit at once if it is lost.

Exiting on loss is what controller-runtime does: a replica that cannot renew for renew_deadline may
already have been replaced, so it must not take one more action; the Deployment restarts it as
a standby.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from qlora_operator import metrics
from qlora_operator.kube import Kube
from qlora_operator.leader_election import LeaderElector, LeaseLock
from qlora_operator.settings import OperatorSettings

log = logging.getLogger(__name__)
EXIT_LEADERSHIP_LOST = 3


class _StandbyHealth(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        ok = self.path.split("?")[0] == "/healthz"
        body = b'{"standby": true}' if ok else b"not found"
        self.send_response(200 if ok else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_) -> None:  # probes every few seconds would flood the log
        pass


def standby_health_server(port: int) -> ThreadingHTTPServer | None:
    """/healthz while standing by, on the port kopf's liveness endpoint takes over once leading, so
    a standby is not restarted by its liveness probe."""
    if not port:
        return None
    server = ThreadingHTTPServer(("0.0.0.0", port), _StandbyHealth)
    threading.Thread(target=server.serve_forever, name="qlora-standby-health", daemon=True).start()
    return server


def elector_for(kube: Kube, config: OperatorSettings) -> LeaderElector:
    # two Lease requests fit in a renew deadline however the connection fails (30 s otherwise)
    lock = LeaseLock(kube, config.leader_election_namespace, config.leader_election_lease,
                     timeout=config.renew_deadline / 2)
    return LeaderElector(lock,
                         identity=config.leader_election_identity, lease_duration=config.lease_duration,
                         renew_deadline=config.renew_deadline, retry_period=config.retry_period)


def _exit_now() -> None:
    logging.shutdown()
    os._exit(EXIT_LEADERSHIP_LOST)


def run_while_leading(kube: Kube, config: OperatorSettings, lead: Callable[[], None],
                      on_lost: Callable[[], None] = _exit_now) -> None:
    """Stand by until this replica holds the Lease, then `lead()` (blocks until a graceful stop),
    then release the Lease so a standby takes over within one retry period."""
    elector = elector_for(kube, config)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    health = standby_health_server(config.health_port)
    try:
        if not elector.acquire(stop):
            log.info("stopped while standing by")
            sys.exit(0)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if health is not None:
            health.shutdown()
            health.server_close()
    metrics.LEADER.set(1)
    elector.keep_renewing(on_lost=on_lost)
    try:
        lead()
    finally:
        metrics.LEADER.set(0)
        elector.release()
