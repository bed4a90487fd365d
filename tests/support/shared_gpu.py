"""The local cluster has one GPU, shared by every suite and the demo: tests that run trainer pods
wait for whoever else holds it rather than fail on timeouts."""

import json
import time

from qlora_localcluster.testing import kubectl


def gpu_holders(cluster) -> list[str]:
    """Pods elsewhere in the cluster that hold a GPU (a demo, another suite on the shared cluster)."""
    pods = json.loads(kubectl(cluster, "get", "pods", "-A", "-o", "json").stdout)["items"]
    return [f"{p['metadata']['namespace']}/{p['metadata']['name']}" for p in pods
            if p["spec"].get("nodeName") and p["status"].get("phase") in ("Pending", "Running")
            and any("nvidia.com/gpu" in (c.get("resources", {}).get("limits") or {}) for c in p["spec"]["containers"])]


def wait_for_the_gpu(cluster, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while (holders := gpu_holders(cluster)) and time.monotonic() < deadline:
        time.sleep(2)
    assert not holders, f"the local cluster's GPU is busy with {holders}"
