"""Fixtures shared by the whole suite. The local cluster starts once per session (seconds once
its binaries are built) and every cluster test works in a namespace of its own."""

import uuid

import pytest
from qlora_localcluster import testing as cluster_testing
from support import crd_schema_lock


@pytest.fixture(scope="session")
def local_cluster():
    with cluster_testing.running_cluster() as cluster:
        yield cluster


@pytest.fixture
def namespace(local_cluster, request):
    """A fresh namespace, deleted (without waiting) after the test. The test runs while no other
    one has the shared QLoRAJob CRD at another schema (support/crd_schema_lock.py)."""
    name = f"t-{request.node.name[:30].lower().replace('_', '-').strip('-')}-{uuid.uuid4().hex[:5]}"
    name = "".join(c for c in name if c.isalnum() or c == "-")
    with crd_schema_lock.schema_in_use(local_cluster):
        cluster_testing.kubectl(local_cluster, "create", "namespace", name)
        yield name
        cluster_testing.kubectl(local_cluster, "delete", "namespace", name, "--wait=false", check=False)
