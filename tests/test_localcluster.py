"""The local cluster behaves like a real one: versioned API, real RBAC, a schedulable GPU node, S3.

    .venv/bin/pytest tests/test_localcluster.py     # builds the binaries the first time (minutes)
"""

from __future__ import annotations

import json
import time
import uuid

import pytest
from qlora_localcluster.build import KUBERNETES_VERSION
from qlora_localcluster.testing import kubectl

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def cluster(local_cluster):
    return local_cluster  # the session's: a cluster of this module's own would stop it for every other worker


@pytest.fixture
def namespace(cluster):
    name = f"test-lc-{uuid.uuid4().hex[:6]}"
    kubectl(cluster, "create", "namespace", name)
    yield name
    kubectl(cluster, "delete", "namespace", name, "--wait=false")


def test_kubectl_sees_the_pinned_server_version(cluster):
    version = json.loads(kubectl(cluster, "version", "-o", "json").stdout)
    assert version["serverVersion"]["gitVersion"] == KUBERNETES_VERSION
    assert version["clientVersion"]["gitVersion"] == KUBERNETES_VERSION


def test_rbac_denies_a_service_account_until_it_is_bound(cluster, namespace):
    kubectl(cluster, "-n", namespace, "create", "serviceaccount", "nobody")
    who = f"--as=system:serviceaccount:{namespace}:nobody"
    denied = kubectl(cluster, "-n", namespace, "auth", "can-i", "list", "pods", who, check=False)
    assert denied.stdout.strip() == "no"
    assert denied.returncode != 0

    kubectl(cluster, "-n", namespace, "create", "role", "pod-reader", "--verb=list", "--resource=pods")
    kubectl(cluster, "-n", namespace, "create", "rolebinding", "nobody-reads",
            "--role=pod-reader", f"--serviceaccount={namespace}:nobody")
    allowed = kubectl(cluster, "-n", namespace, "auth", "can-i", "list", "pods", who, check=False)
    assert allowed.stdout.strip() == "yes"


def test_gpu_node_is_ready_and_advertises_its_gpu(cluster):
    node = json.loads(kubectl(cluster, "get", "node", "gpu-node-0", "-o", "json").stdout)
    ready = {c["type"]: c["status"] for c in node["status"]["conditions"]}["Ready"]
    assert ready == "True"
    assert node["status"]["allocatable"]["nvidia.com/gpu"] == "1"
    assert node["metadata"]["labels"].get("nvidia.com/gpu.product")


def test_scheduler_refuses_a_pod_that_wants_more_gpus_than_a_node_has(cluster, namespace):
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "greedy", "namespace": namespace},
        "spec": {"containers": [{"name": "train", "image": "trainer:dev",
                                 "resources": {"limits": {"nvidia.com/gpu": "2"}}}]},
    }
    kubectl(cluster, "apply", "-f", "-", input=json.dumps(pod))
    message = _wait_for_event(cluster, namespace, "greedy", "FailedScheduling")
    assert "Insufficient nvidia.com/gpu" in message
    phase = kubectl(cluster, "-n", namespace, "get", "pod", "greedy", "-o", "jsonpath={.status.phase}").stdout
    assert phase == "Pending"


def test_kubectl_logs_reach_the_node_agent_through_the_apiserver(cluster, namespace):
    """The apiserver's kubelet-client cert and the agent's serving cert, both checked against the CA."""
    kubectl(cluster, "-n", namespace, "run", "hello", "--image=busybox", "--restart=Never",
            "--", "sh", "-c", "echo hello from a pod")
    kubectl(cluster, "-n", namespace, "wait", "--for=jsonpath={.status.phase}=Succeeded", "pod/hello",
            "--timeout=60s")
    assert kubectl(cluster, "-n", namespace, "logs", "hello").stdout == "hello from a pod\n"


def test_s3_server_stores_and_returns_objects(cluster):
    boto3 = pytest.importorskip("boto3")
    s3 = boto3.client("s3", endpoint_url=cluster.s3_endpoint, region_name="us-east-1",
                      **cluster.s3_credentials)
    bucket = f"test-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket=bucket, Key="adapter/config.json", Body=b'{"r": 16}')
    assert s3.get_object(Bucket=bucket, Key="adapter/config.json")["Body"].read() == b'{"r": 16}'
    listed = s3.list_objects_v2(Bucket=bucket)["Contents"]
    assert [o["Key"] for o in listed] == ["adapter/config.json"]


def _wait_for_event(cluster, namespace: str, name: str, reason: str, timeout: float = 60.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        events = json.loads(kubectl(cluster, "-n", namespace, "get", "events", "-o", "json",
                                    f"--field-selector=involvedObject.name={name},reason={reason}").stdout)
        if events["items"]:
            return events["items"][-1]["message"]
        time.sleep(1)
    raise AssertionError(f"no {reason} event for {namespace}/{name} within {timeout:.0f} s")


def test_a_new_crd_is_waited_for_until_established_and_a_missing_one_times_out_by_name(cluster):
    """wait_crds_established (not `kubectl wait`, which fails at once on a CRD whose conditions are
    still null): a CRD created the moment before is served when the wait returns."""
    group = f"w{uuid.uuid4().hex[:8]}.example.dev"
    name = f"widgets.{group}"
    crd = {"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition", "metadata": {"name": name},
           "spec": {"group": group, "scope": "Namespaced",
                    "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
                    "versions": [{"name": "v1", "served": True, "storage": True,
                                  "schema": {"openAPIV3Schema": {"type": "object"}}}]}}
    kubectl(cluster, "create", "-f", "-", input=json.dumps(crd))
    try:
        cluster.wait_crds_established(name, timeout=60)
        assert kubectl(cluster, "get", f"widgets.{group}", "-A").returncode == 0  # the kind is served
        started = time.monotonic()
        with pytest.raises(TimeoutError, match=f"nothings.{group}"):
            cluster.wait_crds_established(name, f"nothings.{group}", timeout=2)
        assert time.monotonic() - started < 15
    finally:
        kubectl(cluster, "delete", "crd", name, "--wait=false", check=False)
