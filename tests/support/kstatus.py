"""kstatus, the status library of sigs.k8s.io/cli-utils and of Flux's fork of it (which Flux's health
checks and Helm 4's --wait use), built from their Go modules into a tiny checker (localcluster/kstatus)
by qlora_localcluster.build."""

import json
import subprocess

from qlora_localcluster import build


def compute(obj: dict) -> dict:
    """{"status": Current | InProgress | Failed | ..., "message": ..., "conditions": [...],
    "fluxcd": {"status": ..., "message": ...}} for `obj`."""
    binary = build.ensure_binaries(["kstatus"])["kstatus"]
    done = subprocess.run([str(binary)], input=json.dumps(obj), capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise AssertionError(f"kstatus failed: {done.stderr}")
    return json.loads(done.stdout)
