"""`helm install` of the chart into the local cluster, the path a platform team takes: the real
Deployment, ReplicaSet and scheduler make the operator's pod, the node agent runs it (its image
table maps the operator image to `python -m qlora_operator`), the operator authenticates with the
pod's own projected ServiceAccount token (the kubeconfig the agent writes for it), and drives a
QLoRAJob to Succeeded with the scripted trainer. Then `helm uninstall` takes it all away but the CRD.

    .venv/bin/pytest tests/test_helm_install.py      # ~10 s once the cluster is up
"""

import json
import urllib.request

import pytest
import yaml
from qlora_localcluster import operator_install
from qlora_localcluster.testing import kubectl
from support.helm import helm
from support.objects import qlorajob_manifest
from support.operator_process import free_port, refusals_and_tracebacks
from support.shared_gpu import wait_for_the_gpu

pytestmark = pytest.mark.cluster
CRD = "qlorajobs.training.qlora-operator.dev"


@pytest.fixture
def release(local_cluster, namespace):
    """(release, fullname, metrics port) of an install watching only `namespace`."""
    # The CRD is cluster-scoped and shared with the other cluster tests, which install it this way.
    operator_install.apply_chart(local_cluster)
    wait_for_the_gpu(local_cluster)
    short = namespace.rsplit("-", 1)[1]
    name, fullname, metrics_port = f"qlora-{short}", f"qlora-operator-{short}", free_port()
    helm("install", name, str(operator_install.CHART), "-n", namespace,
         "--set", f"watchNamespaces={{{namespace}}}",
         "--set", "trainerImage.repository=qlora-fake-trainer", "--set", "trainerImage.tag=test",
         "--set", "crds.install=false",
         # ClusterRole and ClusterRoleBinding are named after the release: unique per install.
         "--set", f"fullnameOverride={fullname}",
         # The pod's processes share the host's network: ports of their own, not 8080/8081.
         "--set", f"metrics.port={metrics_port}", "--set", f"healthPort={free_port()}",
         "--set", "reconcileIntervalSeconds=1",
         cluster=local_cluster)
    yield name, fullname, metrics_port
    # The QLoRAJobs, then the release, if the test left it.
    kubectl(local_cluster, "-n", namespace, "delete", "qlorajobs", "--all", "--timeout=60s", check=False)
    helm("uninstall", name, "-n", namespace, "--ignore-not-found", "--wait", cluster=local_cluster, check=False)


def test_helm_install_runs_the_operator_as_its_own_service_account(local_cluster, namespace, release):
    name, fullname, metrics_port = release

    def k(*args, check=True, input=None):
        return kubectl(local_cluster, "-n", namespace, *args, check=check, input=input)

    def operator_log() -> str:
        return k("logs", f"deploy/{fullname}", check=False).stdout

    k("rollout", "status", f"deploy/{fullname}", "--timeout=60s")
    pod = json.loads(k("get", "pods", "-l", f"app.kubernetes.io/instance={name}", "-o", "json").stdout)["items"][0]
    assert pod["spec"]["serviceAccountName"] == fullname
    token_volumes = [v for v in pod["spec"]["volumes"]
                     if any("serviceAccountToken" in s for s in (v.get("projected") or {}).get("sources", []))]
    assert token_volumes, "the ServiceAccount admission plugin mounts the pod's token"
    assert pod["status"]["containerStatuses"][0]["imageID"].startswith("local-image-table://qlora-operator@")

    k("create", "secret", "generic", "s3",
      "--from-literal=AWS_ACCESS_KEY_ID=test", "--from-literal=AWS_SECRET_ACCESS_KEY=test-secret")
    spec = {"model": {"uri": "hf://fake/succeed"}, "output": {"credentialsSecretRef": {"name": "s3"}},
            "training": {"maxSteps": 10}}  # no image: the chart's trainerImage is the default
    k("apply", "-f", "-", input=yaml.safe_dump(qlorajob_manifest("happy", namespace, spec)))
    waited = k("wait", "--for=condition=Succeeded", "qlorajob/happy", "--timeout=45s", check=False)
    assert waited.returncode == 0, waited.stderr + operator_log()

    job = json.loads(k("get", "qlorajob", "happy", "-o", "json").stdout)
    status, uid = job["status"], job["metadata"]["uid"]
    assert status["phase"] == "Succeeded" and status["jobName"] == "happy-1"
    assert status["result"]["adapterUri"] == f"s3://adapters/adapters/{namespace}/happy/{uid}/"
    assert status["progress"]["summary"] == "10/10 (100%)"
    trainer = json.loads(k("get", "job", "happy-1", "-o", "json").stdout)
    assert trainer["spec"]["template"]["spec"]["containers"][0]["image"] == "qlora-fake-trainer:test"
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
        assert 'qlora_operator_jobs{phase="Succeeded"} 1.0' in r.read().decode()
    log = operator_log()
    assert "Initial authentication has finished" in log
    denied = refusals_and_tracebacks(log)
    assert denied == [], "the chart's RBAC lets the operator do all it needs"

    k("delete", "qlorajob", "happy", "--timeout=60s")
    helm("uninstall", name, "-n", namespace, "--wait", cluster=local_cluster)
    k("wait", "--for=delete", "pod", "-l", f"app.kubernetes.io/instance={name}", "--timeout=30s")
    for kind in ("deployment", "serviceaccount", "clusterrole", "clusterrolebinding"):
        gone = k("get", kind, fullname, check=False)  # -n is ignored for the cluster-scoped ones
        assert "NotFound" in gone.stderr, f"{kind} {fullname} outlived the release"
    kubectl(local_cluster, "get", "crd", CRD)  # crds.install=false: not the release's to remove
