"""Operator settings: command-line flags over QLORA_* environment variables over defaults.

The Helm chart sets the environment variables; flags are for running it by hand:

    qlora-operator --namespace team-a --namespace team-b --reconcile-interval 2
"""

import argparse
import os
import socket
from dataclasses import dataclass, field

DEFAULT_TRAINER_IMAGE = "qlora-operator/trainer:0.2.0"


@dataclass(frozen=True)
class OperatorSettings:
    trainer_image: str = DEFAULT_TRAINER_IMAGE
    namespaces: tuple[str, ...] = ()  # empty: every namespace
    reconcile_interval: float = 5.0  # seconds between re-derivations of each job from its children
    metrics_port: int = 8080  # Prometheus /metrics; 0 turns it off
    health_port: int = 8081  # kopf's liveness endpoint /healthz; 0 turns it off
    log_level: str = "INFO"
    # Back-off before attempt n+1: retry_delay * 2**(n-1), at most retry_delay_max (as batch/v1 Jobs do).
    retry_delay: float = 10.0
    retry_delay_max: float = 300.0
    # Threads that reconcile queued jobs (workqueue.py): enough to keep the API server's latency
    # hidden when a thousand jobs arrive at once, few enough not to flood it.
    reconcile_workers: int = 16
    log_tail_lines: int = 50  # of the running trainer's log, read for progress lines each reconcile
    kopf_annotation_prefix: str = field(default="qlora-operator.dev")
    # Lease-based leader election (the chart turns it on for its replicas): only the holder of
    # Lease <leader_election_namespace>/<leader_election_lease> reconciles. client-go's defaults.
    leader_election: bool = False
    leader_election_namespace: str = "default"
    leader_election_lease: str = "qlora-operator"
    leader_election_identity: str = field(default_factory=lambda: os.environ.get("HOSTNAME") or socket.gethostname())
    lease_duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0

    @property
    def all_namespaces(self) -> bool:
        return not self.namespaces


DEFAULTS = OperatorSettings()

_ENV = {
    "trainer_image": "QLORA_TRAINER_IMAGE",
    "namespaces": "QLORA_WATCH_NAMESPACES",
    "reconcile_interval": "QLORA_RECONCILE_INTERVAL_SECONDS",
    "metrics_port": "QLORA_METRICS_PORT",
    "health_port": "QLORA_HEALTH_PORT",
    "log_level": "QLORA_LOG_LEVEL",
    "retry_delay": "QLORA_RETRY_DELAY_SECONDS",
    "retry_delay_max": "QLORA_RETRY_DELAY_MAX_SECONDS",
    "log_tail_lines": "QLORA_LOG_TAIL_LINES",
    "reconcile_workers": "QLORA_RECONCILE_WORKERS",
    "leader_election": "QLORA_LEADER_ELECTION",
    "leader_election_namespace": "QLORA_LEADER_ELECTION_NAMESPACE",
    "leader_election_lease": "QLORA_LEADER_ELECTION_LEASE",
    "leader_election_identity": "QLORA_POD_NAME",
    "lease_duration": "QLORA_LEASE_DURATION_SECONDS",
    "renew_deadline": "QLORA_RENEW_DEADLINE_SECONDS",
    "retry_period": "QLORA_RETRY_PERIOD_SECONDS",
}

_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


def _boolean(var: str, raw: str) -> bool:
    if raw.lower() in _TRUE | _FALSE:
        return raw.lower() in _TRUE
    raise SystemExit(f"{var}={raw!r}: expected true or false")


def _from_env(environ: dict[str, str]) -> dict:
    values: dict = {}
    defaults = DEFAULTS
    for name, var in _ENV.items():
        raw = environ.get(var, "").strip()
        if not raw:
            continue
        if name == "namespaces":
            values[name] = tuple(n.strip() for n in raw.split(",") if n.strip())
        elif isinstance(getattr(defaults, name), bool):
            values[name] = _boolean(var, raw)
        else:
            kind = type(getattr(defaults, name))
            try:
                values[name] = kind(raw)
            except ValueError:
                raise SystemExit(f"{var}={raw!r}: expected {'an integer' if kind is int else 'a number'}") from None
    return values


def _checked(settings: OperatorSettings) -> OperatorSettings:
    """Values that would leave the operator running but doing nothing are refused at start."""
    if settings.reconcile_workers < 1:
        raise SystemExit(f"{_ENV['reconcile_workers']}={settings.reconcile_workers}: at least 1 reconcile worker")
    if settings.reconcile_interval <= 0:
        raise SystemExit(f"{_ENV['reconcile_interval']}={settings.reconcile_interval}: expected seconds > 0")
    return settings


def parse(argv: list[str] | None = None, environ: dict[str, str] | None = None) -> OperatorSettings:
    values = _from_env(dict(os.environ if environ is None else environ))
    parser = argparse.ArgumentParser(prog="qlora-operator", description="Runs QLoRAJobs as trainer Jobs.")
    parser.add_argument("--namespace", "-n", action="append", dest="namespaces",
                        help=f"watch this namespace (repeatable; default all, or ${_ENV['namespaces']})")
    parser.add_argument("--all-namespaces", "-A", action="store_true", help="watch every namespace")
    parser.add_argument("--trainer-image", help=f"default trainer image (${_ENV['trainer_image']})")
    parser.add_argument("--reconcile-interval", type=float, help="seconds between re-derivations of each job")
    parser.add_argument("--metrics-port", type=int, help="Prometheus port, 0 for none")
    parser.add_argument("--health-port", type=int, help="liveness port, 0 for none")
    parser.add_argument("--retry-delay", type=float, help="seconds before attempt 2 (doubling after)")
    parser.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    parser.add_argument("--leader-elect", dest="leader_election", action="store_true", default=None,
                        help=f"reconcile only while holding the leader Lease (${_ENV['leader_election']})")
    parser.add_argument("--leader-election-namespace", help="namespace of the leader Lease")
    parser.add_argument("--leader-election-lease", help="name of the leader Lease")
    parser.add_argument("--lease-duration", type=float, help="seconds a standby waits for an unrenewed Lease")
    parser.add_argument("--renew-deadline", type=float, help="seconds the leader retries renewing before it exits")
    parser.add_argument("--retry-period", type=float, help="seconds between Lease acquire/renew attempts")
    args = parser.parse_args(argv)
    for name in ("trainer_image", "reconcile_interval", "metrics_port", "health_port", "retry_delay", "log_level",
                 "leader_election", "leader_election_namespace", "leader_election_lease", "lease_duration",
                 "renew_deadline", "retry_period"):
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    if args.namespaces:
        values["namespaces"] = tuple(args.namespaces)
    if args.all_namespaces:
        values["namespaces"] = ()
    return _checked(OperatorSettings(**values))
