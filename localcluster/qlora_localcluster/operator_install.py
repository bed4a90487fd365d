"""The operator in the local cluster, from the Helm chart.

- `install(cluster)` (the demo): `helm upgrade --install` of the chart, as a platform team would run
  it; the node agent runs the Deployment's pod (its image table maps the operator image to
  `python -m qlora_operator`) with the pod's own ServiceAccount token.
- `apply_chart` + `service_account_kubeconfig` (the tests): the chart's CRD and RBAC, and a
  kubeconfig for that ServiceAccount, for an operator the test runs as a subprocess in its own
  namespace, to kill and restart it at will.

Either way every API call the operator makes goes through the real RBAC authorizer."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import yaml

from . import build
from .cluster import LocalCluster

NAMESPACE = "qlora-system"
RELEASE = "qlora"
SERVICE_ACCOUNT = "qlora-qlora-operator"  # the chart's fullname for release "qlora"
CHART = Path(__file__).resolve().parents[2] / "charts" / "qlora-operator"
# Kinds taken from the chart: the Deployment would ask the node agent for an image it cannot run.
INSTALLED_KINDS = {"CustomResourceDefinition", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role",
                   "RoleBinding"}
LEADER_LEASE = SERVICE_ACCOUNT  # the chart names the leader Lease after the release's full name


def _tool(name: str) -> str:
    return str(build.ensure_binaries([name])[name])


def kubectl(cluster: LocalCluster, *args: str, input: str | None = None) -> str:
    result = cluster.kubectl(*args, input=input)
    if result.returncode != 0:
        raise RuntimeError(f"kubectl {' '.join(args)}: {result.stderr.strip()}")
    return result.stdout


def chart_objects(watch_namespaces: list[str] | None = None, release: str = RELEASE) -> list[dict]:
    # --skip-tests: the `helm test` hook's ServiceAccount and roles exist only while a test runs.
    args = [_tool("helm"), "template", release, str(CHART), "--namespace", NAMESPACE, "--skip-tests"]
    if watch_namespaces:
        args += ["--set", "watchNamespaces={" + ",".join(watch_namespaces) + "}"]
    rendered = subprocess.run(args, capture_output=True, text=True, check=True, timeout=120).stdout
    return [d for d in yaml.safe_load_all(rendered) if d and d["kind"] in INSTALLED_KINDS]


def apply_chart(cluster: LocalCluster, release: str = RELEASE) -> None:
    """`release` names the ServiceAccount and ClusterRole: a test that needs this tree's RBAC while
    other test sessions apply theirs to the same cluster uses a release name of its own."""
    kubectl(cluster, "apply", "-f", "-", input=json.dumps(
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}))
    manifest = "\n---\n".join(json.dumps(d) for d in chart_objects(release=release))
    kubectl(cluster, "apply", "--server-side", "--force-conflicts", "-f", "-", input=manifest)
    cluster.wait_crds_established("qlorajobs.training.qlora-operator.dev", timeout=60)


def service_account_kubeconfig(cluster: LocalCluster, path: Path | None = None, release: str = RELEASE) -> Path:
    """A kubeconfig that authenticates as the operator's ServiceAccount (a 24 h bound token)."""
    account = SERVICE_ACCOUNT if release == RELEASE else f"{release}-qlora-operator"  # the chart's fullname
    token = kubectl(cluster, "create", "token", account, "-n", NAMESPACE, "--duration=24h").strip()
    admin = yaml.safe_load(cluster.kubeconfig.read_text())
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": admin["clusters"],
        "users": [{"name": account, "user": {"token": token}}],
        "contexts": [{"name": "operator", "context": {"cluster": admin["clusters"][0]["name"], "user": account}}],
        "current-context": "operator",
    }
    path = path or cluster.state_dir / "operator.kubeconfig"
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)
    return path


DEMO_RELEASE = "qlora-operator"  # fullname "qlora-operator": apart from the tests' "qlora-qlora-operator"
DEMO_NAMESPACE = "default"


def install(cluster: LocalCluster) -> str:
    """The CRD (applied like the tests do, so neither owns it alone), then the chart's release
    watching the demo's namespace. Returns the operator pod's name once it runs."""
    apply_chart(cluster)
    helm = subprocess.run(
        [_tool("helm"), "upgrade", "--install", DEMO_RELEASE, str(CHART), "--namespace", NAMESPACE,
         "--kubeconfig", str(cluster.kubeconfig),
         "--set", "crds.install=false", "--set", f"watchNamespaces={{{DEMO_NAMESPACE}}}",
         "--set", "reconcileIntervalSeconds=2",
         # The pod's processes share the host's network: ports of their own, not 8080/8081. For the
         # same reason one replica (two would collide on them; leader election still runs, and
         # tests/test_leader_election.py runs two replicas as processes with ports of their own).
         "--set", "metrics.port=18080", "--set", "healthPort=18081", "--set", "replicaCount=1",
         "--wait", "--timeout=120s"],
        capture_output=True, text=True, timeout=180)
    if helm.returncode != 0:
        raise RuntimeError(f"helm upgrade --install {DEMO_RELEASE}: {helm.stderr.strip()}")
    selector = f"app.kubernetes.io/instance={DEMO_RELEASE}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        pods = json.loads(kubectl(cluster, "-n", NAMESPACE, "get", "pods", "-l", selector, "-o", "json"))["items"]
        running = [p["metadata"]["name"] for p in pods if p.get("status", {}).get("phase") == "Running"]
        if running:
            return running[0]
        time.sleep(1)
    raise RuntimeError(f"the operator pod did not start:\n{kubectl(cluster, '-n', NAMESPACE, 'describe', 'pods', '-l', selector)}")
