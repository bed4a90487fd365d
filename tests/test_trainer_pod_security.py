"""The trainer pod meets the Kubernetes "restricted" Pod Security Standard, as judged by the real
API server's PodSecurity admission in a namespace that enforces it (server-side dry run)."""

import copy
import json

import pytest
from qlora_localcluster.testing import kubectl
from qlora_operator.rendering import render_trainer_job
from support.objects import FULL_RESOURCES, qlorajob

pytestmark = pytest.mark.cluster


def trainer_pod(namespace: str) -> dict:
    # Every resources field but the two that name cluster objects (admission checks they exist).
    resources = {k: v for k, v in FULL_RESOURCES.items() if k not in ("priorityClassName", "runtimeClassName")}
    job = render_trainer_job(qlorajob(namespace=namespace, spec={"resources": resources}), 1,
                             default_image="trainer:test", active_deadline_seconds=None)
    template = job["spec"]["template"]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {**template["metadata"], "name": "trainer", "namespace": namespace},
            "spec": template["spec"]}


def dry_run(cluster, pod: dict):
    return kubectl(cluster, "create", "--dry-run=server", "-f", "-", input=json.dumps(pod), check=False)


def test_the_trainer_pod_is_admitted_where_the_restricted_standard_is_enforced(local_cluster, namespace):
    kubectl(local_cluster, "label", "namespace", namespace, "pod-security.kubernetes.io/enforce=restricted",
            "pod-security.kubernetes.io/enforce-version=latest")
    pod = trainer_pod(namespace)
    admitted = dry_run(local_cluster, pod)
    assert admitted.returncode == 0, admitted.stderr
    assert "violate" not in admitted.stderr  # no PodSecurity warning either

    # The same pod without its securityContext is refused, naming what the standard requires.
    bare = copy.deepcopy(pod)
    del bare["spec"]["securityContext"]
    del bare["spec"]["containers"][0]["securityContext"]
    refused = dry_run(local_cluster, bare)
    assert refused.returncode != 0 and 'violates PodSecurity "restricted:latest"' in refused.stderr
    for requirement in ("allowPrivilegeEscalation != false", "unrestricted capabilities", "runAsNonRoot != true",
                        "seccompProfile"):
        assert requirement in refused.stderr, requirement
