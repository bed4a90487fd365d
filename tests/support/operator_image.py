"""What "the operator image works" means on the local cluster, for an entrypoint started from a fresh
virtualenv (tests/test_operator_image.py) or from a built image's root filesystem
(tests/test_image_build.py): its /healthz answers, and it reconciles a QLoRAJob it watches, as its
own ServiceAccount, into a trainer Job the API server accepted."""

import json
import subprocess
import time
from pathlib import Path

import yaml
from qlora_localcluster.testing import kubectl

from support.objects import MINIMAL_SPEC
from support.operator_process import wait_for_healthz


def wait_healthy(proc: subprocess.Popen, port: int, log: Path, timeout: float = 60.0) -> None:
    wait_for_healthz(proc, port, lambda: tail(log), timeout)


def assert_it_reconciles(cluster, namespace: str, log: Path, name: str = "from-image", timeout: float = 60.0) -> dict:
    """Apply a suspended QLoRAJob (so no GPU is needed) and wait for the operator to accept it and
    create its first trainer Job, suspended. Returns that Job."""
    manifest = {"apiVersion": "training.qlora-operator.dev/v1alpha1", "kind": "QLoRAJob",
                "metadata": {"name": name, "namespace": namespace}, "spec": {**MINIMAL_SPEC, "suspend": True}}
    kubectl(cluster, "apply", "-f", "-", input=yaml.safe_dump(manifest))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        qlorajob = json.loads(kubectl(cluster, "-n", namespace, "get", "qlorajob", name, "-o", "json").stdout)
        conditions = {c["type"]: c["status"] for c in (qlorajob.get("status") or {}).get("conditions", [])}
        jobs = kubectl(cluster, "-n", namespace, "get", "job", f"{name}-1", "-o", "json", check=False)
        if conditions.get("Accepted") == "True" and conditions.get("Suspended") == "True" and jobs.returncode == 0:
            job = json.loads(jobs.stdout)
            assert job["spec"]["suspend"] is True
            assert job["metadata"]["ownerReferences"][0]["uid"] == qlorajob["metadata"]["uid"]
            return job
        time.sleep(0.5)
    raise AssertionError(f"{name} was not reconciled within {timeout} s:\n{tail(log)}")


def tail(log: Path, lines: int = 40) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
