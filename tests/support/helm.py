"""The real helm binary (built by qlora_localcluster.build), for chart tests."""

import subprocess

from qlora_localcluster import build


def helm(*args: str, cluster=None, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """`helm <args>`, against `cluster` (a LocalCluster) when given; output captured as text."""
    binary = build.ensure_binaries(["helm"])["helm"]
    target = ["--kubeconfig", str(cluster.kubeconfig)] if cluster is not None else []
    result = subprocess.run([str(binary), *args, *target], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed: {result.stderr}")
    return result
