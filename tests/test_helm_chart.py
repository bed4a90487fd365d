"""The Helm chart: lint, schema, rendering, and an install into the local cluster's real API server."""

import json

import pytest
import yaml
from qlora_api.crd import CHART_CRD_PATH, render_crd
from qlora_localcluster.testing import kubectl
from support.helm import helm

CHART = CHART_CRD_PATH.parents[1]


def rendered(*values: str, namespace: str = "qlora-system") -> list[dict]:
    """The release's own objects; the `helm test` hook's are tested in test_helm_manifests.py and
    test_helm_lifecycle.py."""
    args = ["template", "qlora", str(CHART), "--namespace", namespace, "--skip-tests"]
    for value in values:
        args += ["--set", value]
    return [doc for doc in yaml.safe_load_all(helm(*args).stdout) if doc]


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def test_chart_lints_cleanly():
    result = helm("lint", "--strict", str(CHART))
    assert "0 chart(s) failed" in result.stdout


def test_default_render_has_the_crd_operator_and_least_privilege_rbac():
    docs = rendered()
    crd = by_kind(docs, "CustomResourceDefinition")[0]
    assert crd["spec"] == render_crd()["spec"]
    assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    rules = by_kind(docs, "ClusterRole")[0]["rules"]
    resources = {r for rule in rules for r in rule["resources"]}
    assert "secrets" not in resources, "the operator must never read Secrets"
    assert {"qlorajobs/status", "jobs", "pods/log", "configmaps", "events"} <= resources
    container = by_kind(docs, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["QLORA_TRAINER_IMAGE"] == "ghcr.io/qlora-operator/trainer:0.2.0"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True


def test_switches_change_what_is_rendered():
    docs = rendered("crds.install=false", "rbac.create=false", "watchNamespaces={ml,research}",
                    "trainerImage.tag=v9", "reconcileWorkers=32")
    assert not by_kind(docs, "CustomResourceDefinition") and not by_kind(docs, "ClusterRole")
    env = {e["name"]: e.get("value")
           for e in by_kind(docs, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["QLORA_WATCH_NAMESPACES"] == "ml,research"
    assert env["QLORA_TRAINER_IMAGE"].endswith(":v9")
    assert env["QLORA_RECONCILE_WORKERS"] == "32"
    crd_kept = by_kind(rendered("crds.keep=false"), "CustomResourceDefinition")[0]
    assert "helm.sh/resource-policy" not in (crd_kept["metadata"].get("annotations") or {})


@pytest.mark.parametrize("value,complaint", [
    ("imagee.tag=x", "imagee"),
    ("logLevel=LOUD", "logLevel"),
    ("reconcileIntervalSeconds=0", "reconcileIntervalSeconds"),
    ("reconcileWorkers=0", "reconcileWorkers"),
])
def test_schema_rejects_bad_values_by_name(value, complaint):
    result = helm("template", "qlora", str(CHART), "--set", value, check=False)
    assert result.returncode != 0
    assert complaint in result.stderr


def test_rendered_chart_is_accepted_by_the_api_server(local_cluster, namespace):
    docs = rendered(f"watchNamespaces={{{namespace}}}", namespace=namespace)
    manifest = "\n---\n".join(json.dumps(d) for d in docs)
    result = kubectl(local_cluster, "apply", "--dry-run=server", "-n", namespace, "-f", "-", input=manifest)
    assert "customresourcedefinition.apiextensions.k8s.io/qlorajobs.training.qlora-operator.dev" in result.stdout
    assert "clusterrole.rbac.authorization.k8s.io/qlora-qlora-operator" in result.stdout


def test_two_replicas_elect_a_leader_on_a_lease_and_a_budget_keeps_one_up():
    docs = rendered()
    deployment = by_kind(docs, "Deployment")[0]
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["strategy"]["type"] == "RollingUpdate"
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}
    assert env["QLORA_LEADER_ELECTION"] == "true"
    assert env["QLORA_LEADER_ELECTION_LEASE"] == "qlora-qlora-operator"
    assert env["QLORA_POD_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["QLORA_LEADER_ELECTION_NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    anti = deployment["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
    assert anti["preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"]["topologyKey"] == \
        "kubernetes.io/hostname"
    pdb = by_kind(docs, "PodDisruptionBudget")[0]
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    role = by_kind(docs, "Role")[0]
    assert role["metadata"]["namespace"] == "qlora-system"
    granted = {(verb, tuple(rule.get("resourceNames", []))) for rule in role["rules"] for verb in rule["verbs"]
               if rule["resources"] == ["leases"]}
    assert granted == {("create", ()), ("get", ("qlora-qlora-operator",)), ("update", ("qlora-qlora-operator",))}
    assert by_kind(docs, "RoleBinding")[0]["roleRef"]["name"] == role["metadata"]["name"]


def test_one_replica_without_election_recreates_and_has_no_budget():
    docs = rendered("replicaCount=1", "leaderElection.enabled=false")
    deployment = by_kind(docs, "Deployment")[0]
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    assert not by_kind(docs, "PodDisruptionBudget") and not by_kind(docs, "Role")


@pytest.mark.parametrize("values,complaint", [
    (["leaderElection.enabled=false"], "replicaCount > 1 needs leaderElection.enabled"),
    (["leaderElection.renewDeadlineSeconds=20"], "retryPeriodSeconds < renewDeadlineSeconds < leaseDurationSeconds"),
])
def test_unsafe_replica_settings_are_refused(values, complaint):
    args = ["template", "qlora", str(CHART)]
    for value in values:
        args += ["--set", value]
    result = helm(*args, check=False)
    assert result.returncode != 0 and complaint in result.stderr
