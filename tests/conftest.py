"""Fixtures shared by the whole suite. The local cluster starts once per test run (seconds once
its binaries are built), also when pytest-xdist runs the suite in several worker processes (`make
test`): the first worker that needs it starts it, and the controller stops it after the last test.
Every cluster test works in a namespace of its own."""

import os
import uuid

import pytest
from qlora_localcluster import testing as cluster_testing
from support import crd_schema_lock

RUN_ID = "QLORA_TEST_RUN_ID"  # set by the controller; xdist workers inherit it


def pytest_configure(config):
    if not hasattr(config, "workerinput"):  # the controller, or a run without xdist
        os.environ[RUN_ID] = uuid.uuid4().hex


def pytest_unconfigure(config):
    if not hasattr(config, "workerinput"):  # after every worker has finished
        cluster_testing.stop_session_cluster(os.environ.get(RUN_ID, ""))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """`--dist loadfile` (make test): whole files per worker, the longest first (support/xdist_schedule.py)."""
    if config.getoption("dist") == "loadfile":
        from support.xdist_schedule import LongestFileFirst
        return LongestFileFirst(config, log)
    return None


@pytest.fixture(scope="session")
def local_cluster():
    return cluster_testing.session_cluster(os.environ[RUN_ID])


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
