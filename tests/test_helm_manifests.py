"""Every manifest the chart renders, with default values and with every optional setting on
(charts/qlora-operator/ci/every-feature-values.yaml), passes `helm lint --strict` and the API
server's own validation: a server-side dry run of each object, `helm test` hooks included.

    .venv/bin/pytest tests/test_helm_manifests.py
"""

import json

import pytest
import yaml
from qlora_localcluster import operator_install
from qlora_localcluster.testing import kubectl
from support import servicemonitor_crd
from support.helm import helm

CHART = operator_install.CHART
EVERY_FEATURE = CHART / "ci" / "every-feature-values.yaml"
VALUE_SETS = {"defaults": [], "every-feature": ["--values", str(EVERY_FEATURE)]}
OPTIONAL_KINDS = {"defaults": set(), "every-feature": {"ServiceMonitor"}}


def leaves(tree: dict, below: tuple[str, ...] = ()) -> dict[tuple[str, ...], object]:
    found = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            found.update(leaves(value, below + (key,)))
        else:
            found[below + (key,)] = value
    return found


def setting(tree: dict, path: tuple[str, ...]):
    for key in path:
        tree = tree.get(key) if isinstance(tree, dict) else None
    return tree


def test_the_every_feature_values_turn_on_every_optional_setting():
    """A setting that is off or empty by default (an `enabled`/`create` switch that is false, "",
    [] or {}) is an optional feature: the every-feature file must set it, or what it renders is
    never validated. (Other false booleans, such as allowPrivilegeEscalation, are not features.)"""
    defaults = leaves(yaml.safe_load((CHART / "values.yaml").read_text()))
    chosen = yaml.safe_load(EVERY_FEATURE.read_text())
    off = [path for path, value in defaults.items()
           if value in ("", [], {}) or (value is False and path[-1] in ("enabled", "create"))]
    missing = sorted(".".join(p) for p in off if setting(chosen, p) in (None, False, "", [], {}))
    assert not missing, f"ci/every-feature-values.yaml leaves these off: {missing}"


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_chart_lints_strictly(values):
    result = helm("lint", "--strict", str(CHART), *values)
    assert "1 chart(s) linted, 0 chart(s) failed" in result.stdout, result.stdout


@pytest.mark.cluster
@pytest.mark.parametrize("name", VALUE_SETS)
def test_every_rendered_object_passes_a_server_side_dry_run(local_cluster, namespace, name):
    rendered = helm("template", "dry", str(CHART), "--namespace", namespace, *VALUE_SETS[name]).stdout
    docs = [d for d in yaml.safe_load_all(rendered) if d]
    kinds = {d["kind"] for d in docs}
    # The helm test hook's Pod is rendered too (helm template includes hooks).
    expected = {"CustomResourceDefinition", "Deployment", "ClusterRole", "Service", "Pod"} | OPTIONAL_KINDS[name]
    assert expected <= kinds, kinds
    if "ServiceMonitor" in kinds:
        servicemonitor_crd.ensure_installed(local_cluster)
    # The ServiceAccount admission plugin refuses a pod whose ServiceAccount does not exist, even in a
    # dry run, so the ServiceAccounts go in for real first (in this test's namespace; validated too).
    accounts = [d for d in docs if d["kind"] == "ServiceAccount"]
    kubectl(local_cluster, "apply", "--server-side", "-n", namespace, "-f", "-",
            input="\n---\n".join(json.dumps(d) for d in accounts))
    # --force-conflicts: the CRD exists and other tests' applies own its fields; a dry run changes nothing.
    applied = kubectl(local_cluster, "apply", "--server-side", "--dry-run=server", "--force-conflicts",
                      "--field-manager=helm-manifests-test", "-n", namespace, "-f", "-",
                      input="\n---\n".join(json.dumps(d) for d in docs), check=False)
    assert applied.returncode == 0, applied.stderr
    for doc in docs:
        group = doc["apiVersion"].split("/")[0] if "/" in doc["apiVersion"] else ""
        resource = f"{doc['kind'].lower()}{'.' + group if group else ''}/{doc['metadata']['name']}"
        assert f"{resource} serverside-applied (server dry run)" in applied.stdout, (resource, applied.stdout)


def test_the_tests_chart_install_leaves_the_helm_test_hook_out():
    """operator_install applies the chart's CRD and RBAC for the cluster tests; the hook's
    ServiceAccount and roles must not become standing objects there."""
    installed = operator_install.chart_objects()
    hooks = [d["metadata"]["name"] for d in installed if "helm.sh/hook" in (d["metadata"].get("annotations") or {})]
    assert installed and not hooks, hooks
