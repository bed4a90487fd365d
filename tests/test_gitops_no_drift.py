"""No drift: what a GitOps tool applies, applied again, changes nothing on the real API server.

Argo CD and Flux re-apply their manifests on every sync (Flux always with server-side apply, Argo CD
with `ServerSideApply=true`). A manifest the server keeps rewriting (a default that differs from
what is written, a quantity it normalises, a field two managers fight over) shows as a permanent
OutOfSync and a resourceVersion that moves at every sync. These apply the sample QLoRAJob and the
chart's rendered manifests twice with server-side apply and compare resourceVersion and managedFields,
and run `kubectl diff --server-side`, which is what `argocd app diff` and `flux diff` amount to.
"""

import json
import time
import uuid
from pathlib import Path

import pytest
import yaml
from qlora_localcluster.testing import kubectl
from support.helm import helm
from support.operator_process import install_crd_and_rbac

pytestmark = pytest.mark.cluster
REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "samples" / "training_v1alpha1_qlorajob.yaml"
CHART = REPO / "charts" / "qlora-operator"


def server_side_apply(cluster, namespace: str, manifest: str) -> None:
    # --force-conflicts as a GitOps controller applies: it owns what it applies. The manager stays
    # kubectl's default, the one the tests' chart install uses, so the shared CRD gains no new owner.
    kubectl(cluster, "-n", namespace, "apply", "--server-side", "--force-conflicts", "-f", "-", input=manifest)


def snapshot(cluster, namespace: str, manifest: str) -> dict[str, tuple[str, list]]:
    """{kind/name: (resourceVersion, managedFields)} of the objects in `manifest`, as stored."""
    listed = json.loads(kubectl(cluster, "-n", namespace, "get", "-f", "-", "-o", "json", "--show-managed-fields",
                                input=manifest).stdout)
    items = listed.get("items", [listed])
    return {f"{o['kind']}/{o['metadata']['name']}": (o["metadata"]["resourceVersion"], o["metadata"]["managedFields"])
            for o in items}


def settled(cluster, namespace: str, manifest: str, quiet_polls: int = 3, timeout: float = 60) -> dict:
    """The snapshot once controllers have stopped writing (a Deployment's status, a PDB's, ...)."""
    deadline = time.monotonic() + timeout
    last, quiet = snapshot(cluster, namespace, manifest), 0
    while quiet < quiet_polls:
        assert time.monotonic() < deadline, "the applied objects kept changing"
        time.sleep(1)
        now = snapshot(cluster, namespace, manifest)
        quiet = quiet + 1 if now == last else 0
        last = now
    return last


def test_applying_the_sample_twice_changes_nothing(local_cluster, namespace):
    install_crd_and_rbac(local_cluster)  # the CRD, as the chart renders it
    manifest = SAMPLE.read_text()  # no namespace in it: the test's, and no operator watches that one
    server_side_apply(local_cluster, namespace, manifest)
    first = settled(local_cluster, namespace, manifest)
    server_side_apply(local_cluster, namespace, manifest)
    assert snapshot(local_cluster, namespace, manifest) == first
    server_side_apply(local_cluster, namespace, manifest.replace("backoffLimit: 2", "backoffLimit: 3"))
    assert snapshot(local_cluster, namespace, manifest) != first  # a real change does show


def test_kubectl_diff_of_the_applied_sample_is_empty(local_cluster, namespace):
    install_crd_and_rbac(local_cluster)
    manifest = SAMPLE.read_text()
    server_side_apply(local_cluster, namespace, manifest)
    same = kubectl(local_cluster, "-n", namespace, "diff", "--server-side", "--force-conflicts", "-f", "-",
                   input=manifest, check=False)
    assert (same.returncode, same.stdout, same.stderr) == (0, "", "")

    changed = manifest.replace("backoffLimit: 2", "backoffLimit: 3")  # a field that may change
    assert changed != manifest
    differs = kubectl(local_cluster, "-n", namespace, "diff", "--server-side", "--force-conflicts", "-f", "-",
                      input=changed, check=False)
    assert differs.returncode == 1, differs.stderr  # 1: differences found (>1 would be an error)
    assert "-  backoffLimit: 2" in differs.stdout and "+  backoffLimit: 3" in differs.stdout


def test_applying_the_charts_manifests_twice_changes_nothing(local_cluster, namespace):
    release = f"drift-{uuid.uuid4().hex[:5]}"  # cluster-scoped objects (ClusterRole, ...) of its own
    rendered = helm("template", release, str(CHART), "--namespace", namespace, "--skip-tests",
                    "--set", f"watchNamespaces={{{namespace}}}").stdout  # an operator it starts stays here
    # Hooks are not applied resources: Argo CD runs them as its own sync hooks, Flux through helm.
    docs = [d for d in yaml.safe_load_all(rendered)
            if d and "helm.sh/hook" not in (d["metadata"].get("annotations") or {})]
    kinds = {d["kind"] for d in docs}
    assert {"CustomResourceDefinition", "Deployment", "ClusterRole", "ServiceAccount"} <= kinds
    manifest = "\n---\n".join(json.dumps(d) for d in docs)
    try:
        server_side_apply(local_cluster, namespace, manifest)
        first = settled(local_cluster, namespace, manifest)
        server_side_apply(local_cluster, namespace, manifest)
        assert snapshot(local_cluster, namespace, manifest) == first
    finally:
        cluster_scoped = [f"{d['kind'].lower()}/{d['metadata']['name']}" for d in docs
                          if d["kind"] in ("ClusterRole", "ClusterRoleBinding")]
        kubectl(local_cluster, "delete", "--wait=false", "--ignore-not-found", *cluster_scoped, check=False)
