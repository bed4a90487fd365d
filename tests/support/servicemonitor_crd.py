"""prometheus-operator's ServiceMonitor CRD, from its Go module (as the cluster's binaries come
from theirs), so the chart's optional ServiceMonitor can be validated by the API server.

Installing it adds a kind the cluster did not serve; no other test uses that kind."""

import json
import subprocess
import tempfile
from pathlib import Path

from qlora_localcluster.testing import kubectl

MODULE = "github.com/prometheus-operator/prometheus-operator@v0.85.0"
FILE = "example/prometheus-operator-crd/monitoring.coreos.com_servicemonitors.yaml"
NAME = "servicemonitors.monitoring.coreos.com"


def crd_file() -> Path:
    """The CRD in the Go module cache (downloaded once, about 4 MB)."""
    download = subprocess.run(["go", "mod", "download", "-json", MODULE], capture_output=True, text=True,
                              timeout=600, cwd=tempfile.gettempdir(), check=False)
    if download.returncode != 0:
        raise RuntimeError(f"go mod download {MODULE}: {download.stdout}{download.stderr}")
    return Path(json.loads(download.stdout)["Dir"]) / FILE


def ensure_installed(cluster) -> None:
    if kubectl(cluster, "get", "crd", NAME, check=False).returncode != 0:
        kubectl(cluster, "apply", "--server-side", "-f", str(crd_file()))
    cluster.wait_crds_established(NAME, timeout=60)
