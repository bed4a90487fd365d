"""Installs the operator into the local cluster the way a platform team would, minus the image:
the CRD and the chart's ServiceAccount and least-privilege RBAC are applied from the Helm chart,
and the operator runs as a local process authenticated as that ServiceAccount (a bound token),
so every API call it makes goes through the real RBAC authorizer."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

from . import build, processes
from .cluster import LocalCluster
from .processes import Component

NAMESPACE = "qlora-system"
RELEASE = "qlora"
SERVICE_ACCOUNT = "qlora-qlora-operator"  # the chart's fullname for release "qlora"
CHART = Path(__file__).resolve().parents[2] / "charts" / "qlora-operator"
# Kinds taken from the chart: the Deployment would ask the node agent for an image it cannot run.
INSTALLED_KINDS = {"CustomResourceDefinition", "ServiceAccount", "ClusterRole", "ClusterRoleBinding"}
TRAINER_IMAGE = "ghcr.io/qlora-operator/trainer:0.1.0"


def _tool(name: str) -> str:
    return str(build.ensure_binaries([name])[name])


def kubectl(cluster: LocalCluster, *args: str, input: str | None = None) -> str:
    result = subprocess.run([_tool("kubectl"), "--kubeconfig", str(cluster.kubeconfig), *args],
                            input=input, capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise RuntimeError(f"kubectl {' '.join(args)}: {result.stderr.strip()}")
    return result.stdout


def chart_objects(watch_namespaces: list[str] | None = None) -> list[dict]:
    args = [_tool("helm"), "template", RELEASE, str(CHART), "--namespace", NAMESPACE]
    if watch_namespaces:
        args += ["--set", "watchNamespaces={" + ",".join(watch_namespaces) + "}"]
    rendered = subprocess.run(args, capture_output=True, text=True, check=True, timeout=120).stdout
    return [d for d in yaml.safe_load_all(rendered) if d and d["kind"] in INSTALLED_KINDS]


def apply_chart(cluster: LocalCluster) -> None:
    kubectl(cluster, "apply", "-f", "-", input=json.dumps(
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}))
    manifest = "\n---\n".join(json.dumps(d) for d in chart_objects())
    kubectl(cluster, "apply", "--server-side", "--force-conflicts", "-f", "-", input=manifest)
    kubectl(cluster, "wait", "--for=condition=Established", "--timeout=60s",
            "crd/qlorajobs.training.qlora-operator.dev")


def service_account_kubeconfig(cluster: LocalCluster, path: Path | None = None) -> Path:
    """A kubeconfig that authenticates as the operator's ServiceAccount (a 24 h bound token)."""
    token = kubectl(cluster, "create", "token", SERVICE_ACCOUNT, "-n", NAMESPACE, "--duration=24h").strip()
    admin = yaml.safe_load(cluster.kubeconfig.read_text())
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": admin["clusters"],
        "users": [{"name": SERVICE_ACCOUNT, "user": {"token": token}}],
        "contexts": [{"name": "operator", "context": {"cluster": admin["clusters"][0]["name"], "user": SERVICE_ACCOUNT}}],
        "current-context": "operator",
    }
    path = path or cluster.state_dir / "operator.kubeconfig"
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)
    return path


def operator_component(cluster: LocalCluster, kubeconfig: Path, env: dict[str, str] | None = None) -> Component:
    return Component(
        name="qlora-operator",
        argv=[sys.executable, "-m", "qlora_operator"],
        state_dir=cluster.state_dir,
        env={
            "KUBECONFIG": str(kubeconfig),
            "QLORA_TRAINER_IMAGE": TRAINER_IMAGE,
            # The demo's namespace only: tests run operators of their own in their own namespaces.
            "QLORA_WATCH_NAMESPACES": "default",
            "QLORA_RECONCILE_INTERVAL_SECONDS": "2",
            "QLORA_METRICS_PORT": "18080",
            "QLORA_HEALTH_PORT": "18081",
            **(env or {}),
        },
    )


def install(cluster: LocalCluster, restart: bool = False) -> int:
    """Apply the chart's CRD and RBAC, and (re)start the operator. Returns its pid."""
    apply_chart(cluster)
    component = operator_component(cluster, service_account_kubeconfig(cluster))
    pid = processes.running_pid(component.pidfile)
    if pid and restart:
        processes.stop(component, timeout=20)
        pid = None
    if not pid:
        pid = processes.start(component)
        time.sleep(1)
        if processes.exited(pid):
            raise RuntimeError(f"the operator exited at start:\n{processes.log_tail(component)}")
    return pid


def uninstall(cluster: LocalCluster) -> str:
    return processes.stop(operator_component(cluster, cluster.state_dir / "operator.kubeconfig"), timeout=20)
