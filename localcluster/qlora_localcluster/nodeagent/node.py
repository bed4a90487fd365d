"""The Node object and its Lease: registration, heartbeats, NotReady on a clean stop.

The Lease in kube-node-lease is renewed every quarter of its duration (kubelet's rhythm) and the
node status every `status_interval` seconds, so the node lifecycle controller keeps the node Ready
and never taints it unreachable while the agent runs.
"""

from __future__ import annotations

import logging
import os
import platform
import threading
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from .kube_api import ApiError, KubeApi
from .logs import now_rfc3339
from .status import now_status

log = logging.getLogger(__name__)

RUNTIME_VERSION = "qlora-nodeagent://0.1.0"
_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "arm64": "arm64"}


@dataclass
class NodeConfig:
    name: str
    port: int
    gpus: int = 0
    gpu_product: str = "NVIDIA-H100-80GB-HBM3"
    gpu_memory_mib: int = 81559
    cpu: str = str(os.cpu_count() or 1)
    memory: str = f"{psutil.virtual_memory().total // 1024}Ki"
    max_pods: int = 110
    extra_labels: dict[str, str] = field(default_factory=dict)
    lease_seconds: int = 40
    status_interval: float = 20.0

    @property
    def arch(self) -> str:
        return _ARCH.get(platform.machine(), platform.machine())


def node_labels(cfg: NodeConfig) -> dict[str, str]:
    labels = {
        "kubernetes.io/hostname": cfg.name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": cfg.arch,
        "beta.kubernetes.io/os": "linux",
        "beta.kubernetes.io/arch": cfg.arch,
    }
    if cfg.gpus:
        labels.update(
            {
                "nvidia.com/gpu.present": "true",
                "nvidia.com/gpu.product": cfg.gpu_product,
                "nvidia.com/gpu.count": str(cfg.gpus),
                "nvidia.com/gpu.memory": str(cfg.gpu_memory_mib),
            }
        )
    labels.update(cfg.extra_labels)
    return labels


def _read(path: str, default: str = "") -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return default


def _os_image() -> str:
    for line in _read("/etc/os-release").splitlines():
        if line.startswith("PRETTY_NAME="):
            return line.split("=", 1)[1].strip('"')
    return "Linux"


def node_status(
    cfg: NodeConfig, kubelet_version: str, ready: bool, old_conditions: list[dict], message: str = ""
) -> dict:
    now = now_status()
    disk = psutil.disk_usage("/")
    resources = {
        "cpu": cfg.cpu,
        "memory": cfg.memory,
        "pods": str(cfg.max_pods),
        "ephemeral-storage": f"{disk.total // 1024}Ki",
        "nvidia.com/gpu": str(cfg.gpus),
    }
    old = {c["type"]: c for c in old_conditions or []}

    def cond(ctype: str, status: str, reason: str, msg: str) -> dict:
        prev = old.get(ctype)
        since = prev["lastTransitionTime"] if prev and prev.get("status") == status else now
        return {
            "type": ctype,
            "status": status,
            "reason": reason,
            "message": msg,
            "lastHeartbeatTime": now,
            "lastTransitionTime": since,
        }

    conditions = [
        cond(
            "MemoryPressure", "False", "KubeletHasSufficientMemory", "kubelet has sufficient memory available"
        ),
        cond("DiskPressure", "False", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
        cond("PIDPressure", "False", "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
        cond("Ready", "True", "KubeletReady", message or "node agent is posting ready status")
        if ready
        else cond("Ready", "False", "KubeletNotReady", message or "node agent stopped"),
    ]
    return {
        "capacity": resources,
        "allocatable": dict(resources),
        "conditions": conditions,
        "addresses": [
            {"type": "InternalIP", "address": "127.0.0.1"},
            {"type": "Hostname", "address": cfg.name},
        ],
        "daemonEndpoints": {"kubeletEndpoint": {"Port": cfg.port}},
        "nodeInfo": {
            "machineID": _read("/etc/machine-id", cfg.name),
            "systemUUID": _read("/sys/class/dmi/id/product_uuid", cfg.name),
            "bootID": _read("/proc/sys/kernel/random/boot_id"),
            "kernelVersion": platform.release(),
            "osImage": _os_image(),
            "containerRuntimeVersion": RUNTIME_VERSION,
            "kubeletVersion": kubelet_version,
            "kubeProxyVersion": "",
            "operatingSystem": "linux",
            "architecture": cfg.arch,
        },
    }


class NodeHeartbeat:
    def __init__(self, api: KubeApi, cfg: NodeConfig):
        self.api = api
        self.cfg = cfg
        self.kubelet_version = "v0.0.0"
        self._stop = threading.Event()
        self._node_uid = ""

    @property
    def path(self) -> str:
        return f"/api/v1/nodes/{self.cfg.name}"

    def register(self) -> None:
        try:
            version = self.api.get("/version").get("gitVersion", "")
            if version.startswith("v") and version[1:2].isdigit():
                self.kubelet_version = version
        except ApiError:
            pass
        try:
            node = self.api.get(self.path)
            node = self.api.merge_patch(self.path, {"metadata": {"labels": node_labels(self.cfg)}})
        except ApiError as e:
            if not e.not_found:
                raise
            node = self.api.create(
                "/api/v1/nodes",
                {
                    "apiVersion": "v1",
                    "kind": "Node",
                    "metadata": {"name": self.cfg.name, "labels": node_labels(self.cfg)},
                },
            )
            log.info("registered node %s", self.cfg.name)
        self._node_uid = node["metadata"]["uid"]
        self.post_status(ready=True)
        self.renew_lease()

    def post_status(self, ready: bool, message: str = "") -> None:
        try:
            current = self.api.get(self.path)
        except ApiError as e:
            if e.not_found and ready:  # someone deleted the Node: register again
                self.register()
                return
            raise
        status = node_status(
            self.cfg,
            self.kubelet_version,
            ready,
            (current.get("status") or {}).get("conditions") or [],
            message,
        )
        self.api.merge_patch(self.path + "/status", {"status": status})

    def renew_lease(self) -> None:
        path = f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{self.cfg.name}"
        spec = {
            "holderIdentity": self.cfg.name,
            "leaseDurationSeconds": self.cfg.lease_seconds,
            "renewTime": now_rfc3339(),
        }
        try:
            lease = self.api.get(path)
            lease["spec"].update(spec)
            self.api.replace(path, lease)
        except ApiError as e:
            if not e.not_found:
                raise
            self.api.create(
                "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases",
                {
                    "apiVersion": "coordination.k8s.io/v1",
                    "kind": "Lease",
                    "metadata": {
                        "name": self.cfg.name,
                        "namespace": "kube-node-lease",
                        "ownerReferences": [
                            {"apiVersion": "v1", "kind": "Node", "name": self.cfg.name, "uid": self._node_uid}
                        ],
                    },
                    "spec": spec,
                },
            )

    def run_forever(self) -> None:
        renew_every = self.cfg.lease_seconds / 4
        since_status = 0.0
        while not self._stop.wait(renew_every):
            try:
                self.renew_lease()
                since_status += renew_every
                if since_status >= self.cfg.status_interval:
                    since_status = 0.0
                    self.post_status(ready=True)
            except Exception as e:  # the apiserver may restart; keep trying
                log.warning("node heartbeat: %s", e)

    def stop(self, message: str = "node agent stopped") -> None:
        self._stop.set()
        try:
            self.post_status(ready=False, message=message)
        except Exception as e:
            log.warning("could not mark node NotReady: %s", e)
