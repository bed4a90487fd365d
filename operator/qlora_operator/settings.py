"""Operator settings: command-line flags over QLORA_* environment variables over defaults.

The Helm chart sets the environment variables; flags are for running it by hand:

    qlora-operator --namespace team-a --namespace team-b --reconcile-interval 2
"""

import argparse
import os
from dataclasses import dataclass, field

DEFAULT_TRAINER_IMAGE = "qlora-operator/trainer:0.1.0"


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
    log_tail_lines: int = 50  # of the running trainer's log, read for progress lines each reconcile
    kopf_annotation_prefix: str = field(default="qlora-operator.dev")

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
}


def _from_env(environ: dict[str, str]) -> dict:
    values: dict = {}
    defaults = DEFAULTS
    for name, var in _ENV.items():
        raw = environ.get(var, "").strip()
        if not raw:
            continue
        if name == "namespaces":
            values[name] = tuple(n.strip() for n in raw.split(",") if n.strip())
        else:
            values[name] = type(getattr(defaults, name))(raw)
    return values


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
    args = parser.parse_args(argv)
    for name in ("trainer_image", "reconcile_interval", "metrics_port", "health_port", "retry_delay", "log_level"):
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    if args.namespaces:
        values["namespaces"] = tuple(args.namespaces)
    if args.all_namespaces:
        values["namespaces"] = ()
    return OperatorSettings(**values)
