"""One Helm release of the chart in a namespace of its own, with the values every chart version
accepts: the operator watches only that namespace, uses the scripted trainer, and listens on ports
of its own (pods share the host's network on the local cluster)."""

import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from qlora_localcluster.testing import kubectl

from support.helm import helm
from support.operator_process import FAKE_TRAINER_IMAGE, free_port


@dataclass
class HelmRelease:
    cluster: object
    namespace: str
    name: str
    metrics_port: int = field(default_factory=free_port)
    health_port: int = field(default_factory=free_port)

    @property
    def fullname(self) -> str:
        # Named after the release so its ClusterRole and binding cannot collide with another install's.
        return f"{self.name}-operator"

    def values(self) -> list[str]:
        repository, tag = FAKE_TRAINER_IMAGE.split(":")
        pairs = {"fullnameOverride": self.fullname, "watchNamespaces": f"{{{self.namespace}}}",
                 "trainerImage.repository": repository, "trainerImage.tag": tag,
                 "metrics.port": self.metrics_port, "healthPort": self.health_port,
                 "reconcileIntervalSeconds": 1}
        return [arg for key, value in pairs.items() for arg in ("--set", f"{key}={value}")]

    def helm(self, *args: str, check: bool = True, timeout: float = 150) -> subprocess.CompletedProcess[str]:
        return helm(*args, "--namespace", self.namespace, cluster=self.cluster, check=check, timeout=timeout)

    def install(self, chart: Path, *extra: str) -> subprocess.CompletedProcess[str]:
        return self.helm("install", self.name, str(chart), *self.values(), *extra, "--wait", "--timeout=120s")

    def upgrade(self, chart: Path, *extra: str) -> subprocess.CompletedProcess[str]:
        return self.helm("upgrade", self.name, str(chart), *self.values(), *extra, "--wait", "--timeout=120s")

    def history(self) -> list[dict]:
        return json.loads(self.helm("history", self.name, "-o", "json").stdout)

    def kubectl(self, *args: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess[str]:
        return kubectl(self.cluster, "-n", self.namespace, *args, check=check, input=input)

    def get(self, *args: str) -> dict:
        return json.loads(self.kubectl("get", *args, "-o", "json").stdout)

    @property
    def operator_selector(self) -> str:
        return f"app.kubernetes.io/instance={self.name},app.kubernetes.io/name=qlora-operator"

    def operator_pods(self) -> list[dict]:
        """The operator's pods that are not on their way out, however many replicas the chart runs."""
        pods = self.get("pods", "-l", self.operator_selector)["items"]
        return [p for p in pods if not p["metadata"].get("deletionTimestamp")]

    def operator_log(self) -> str:
        return self.kubectl("logs", "-l", self.operator_selector, "--tail=80", "--prefix", check=False).stdout
