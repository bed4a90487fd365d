"""The operator as a real subprocess, authenticated as its own ServiceAccount bound to the
ClusterRole that the Helm chart renders, so every API call it makes is checked by the real RBAC authorizer.
"""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml
from qlora_localcluster import operator_install
from qlora_localcluster.testing import free_ports, kubectl

from support import crd_schema_lock

REPO = Path(__file__).resolve().parents[2]
FAKE_TRAINER_IMAGE = "qlora-fake-trainer:test"


def fake_trainer_qlorajob(name: str, namespace: str, scenario: str = "succeed", steps: int = 10, **spec) -> str:
    """A QLoRAJob (YAML) for the scripted trainer, which picks its scenario from the model URI
    (tests/support/fake_trainer.py); each keyword is a spec section merged into the defaults."""
    body = {
        "model": {"uri": f"hf://fake/{scenario}"},
        "dataset": {"uri": "s3://datasets/chat/train.jsonl"},
        "output": {"bucket": "adapters", "credentialsSecretRef": {"name": "s3"}},
        "training": {"maxSteps": steps},
        "resources": {"image": FAKE_TRAINER_IMAGE},
    }
    for key, value in spec.items():
        body[key] = {**body[key], **value} if isinstance(value, dict) and key in body else value
    return yaml.safe_dump({"apiVersion": "training.qlora-operator.dev/v1alpha1", "kind": "QLoRAJob",
                           "metadata": {"name": name, "namespace": namespace}, "spec": body})


def install_crd_and_rbac(cluster) -> None:
    """The CRD, ServiceAccount and ClusterRole exactly as the Helm chart renders them (never in
    the middle of another test's CRD schema change: support/crd_schema_lock.py)."""
    with crd_schema_lock.schema_in_use(cluster):
        operator_install.apply_chart(cluster)


def service_account_kubeconfig(cluster, path: Path) -> Path:
    return operator_install.service_account_kubeconfig(cluster, path)


def free_port() -> int:
    """A port reserved for this test process (not an ephemeral one: the operator binds it seconds later)."""
    return free_ports(1)[0]


class OperatorProcess:
    """`python -m qlora_operator -n <namespace>`: started, killed and restarted by the test."""

    def __init__(self, kubeconfig: Path, namespace: str, log_path: Path, interval: float = 1.0,
                 trainer_image: str = FAKE_TRAINER_IMAGE, extra_env: dict[str, str] | None = None):
        self.kubeconfig, self.namespace, self.log_path = kubeconfig, namespace, log_path
        self.trainer_image = trainer_image
        self.extra_env = dict(extra_env or {})
        self.metrics_port, self.health_port = free_port(), free_port()
        self.interval = interval
        self.proc: subprocess.Popen | None = None

    def start(self, wait: bool = True) -> "OperatorProcess":
        """Start it; with wait=False return at once (a chaos test may kill it before it is up)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("QLORA_", "KUBERNETES_"))}
        env.update({
            "KUBECONFIG": str(self.kubeconfig),
            "QLORA_TRAINER_IMAGE": self.trainer_image,
            "QLORA_RECONCILE_INTERVAL_SECONDS": str(self.interval),
            "QLORA_RETRY_DELAY_SECONDS": "0",
            "QLORA_METRICS_PORT": str(self.metrics_port),
            "QLORA_HEALTH_PORT": str(self.health_port),
            "QLORA_LOG_LEVEL": "INFO",
            **self.extra_env,
        })
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child holds it
        self.proc = subprocess.Popen([sys.executable, "-m", "qlora_operator", "--namespace", self.namespace],
                                     stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        log.close()
        if wait:
            self.wait_healthy()
        return self

    def wait_healthy(self, timeout: float = 30.0) -> None:
        wait_for_healthz(self.proc, self.health_port, self.log_tail, timeout)

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill9()

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            return r.read().decode()

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def errors_in_log(self) -> list[str]:
        return refusals_and_tracebacks(self.log_path.read_text(errors="replace"))


def wait_for_healthz(proc: subprocess.Popen, port: int, log_tail, timeout: float) -> None:
    """Until the operator's /healthz answers 200 (standing by or leading); fail with its log if it
    exits or stays silent. `log_tail()` gives the log's end for the message."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the operator exited with {proc.returncode}:\n{log_tail()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"the operator's /healthz did not answer in {timeout} s:\n{log_tail()}")


def refusals_and_tracebacks(log: str) -> list[str]:
    """Operator log lines that show a refused API request or a crash. A refusal reads "forbidden"
    (the API server's message, kopf's APIForbiddenError); a bare "403" would also match log
    timestamps (",403]") and UIDs, which once failed a test by chance. The Node authorizer briefly
    refuses the node agent a new pod's ConfigMap or Secret until it sees the binding, and the
    operator quotes that pod status ("no relationship found between node ..."): none of its own
    requests, so not counted."""
    return [line for line in log.splitlines()
            if ("forbidden" in line.lower() and NODE_AUTHORIZER_LAG not in line) or "Traceback" in line]


NODE_AUTHORIZER_LAG = "no relationship found between node"


def get_json(cluster, *args: str) -> dict:
    return json.loads(kubectl(cluster, "get", *args, "-o", "json").stdout)
