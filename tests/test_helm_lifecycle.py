"""The Helm lifecycle a platform team goes through, with the real helm CLI against the local
cluster's real API server: install the previous release's chart (tests/previous_release/), start
QLoRAJobs, upgrade to the working tree's chart while they run (its CRD gains fields), use a field
only the new CRD has, `helm test`, roll back, uninstall. The jobs that spanned the upgrade finish
as they began; the CRD, every QLoRAJob and the adapters in S3 outlive the release.

    .venv/bin/pytest tests/test_helm_lifecycle.py      # ~1 min once the cluster is up

What this covers is the chart and the CRD across versions. The node agent's image table maps every
tag of the operator image to this checkout's operator, so the previous release runs today's code
with the previous chart and CRD.

The CRD is cluster-scoped and every cluster test shares it, expecting the working tree's schema.
From the moment the previous release's CRD goes in until the working tree's is back (also when the
test fails), this test holds crd_schema_lock.schema_change(): no other cluster test runs then, and
none is half-way through a job whose fields the old schema would refuse or prune.
"""

import json
import time
import uuid
from datetime import UTC, datetime

import boto3
import pytest
from botocore.config import Config
from qlora_localcluster import operator_install
from qlora_localcluster.testing import kubectl
from support import crd_schema, crd_schema_lock, previous_release, shared_crd
from support.fake_trainer import STEP_SECONDS
from support.helm_release import HelmRelease
from support.objects import merge, qlorajob_manifest
from support.shared_gpu import wait_for_the_gpu

pytestmark = pytest.mark.cluster

STEPS = 75  # 15 s of scripted training: the upgrade (up to 6 s on a loaded machine) happens inside it
FAKE = {"model": {"uri": "hf://fake/succeed"}, "output": {"credentialsSecretRef": {"name": "s3"}}}


@pytest.fixture
def s3(local_cluster):
    client = boto3.client("s3", endpoint_url=local_cluster.s3_endpoint, region_name="us-east-1",
                          config=Config(s3={"addressing_style": "path"}), **local_cluster.s3_credentials)
    try:
        client.create_bucket(Bucket="adapters")  # the bucket the jobs publish to (objects.MINIMAL_SPEC)
    except client.exceptions.BucketAlreadyOwnedByYou:
        pass
    return client


@pytest.fixture
def release(local_cluster):
    """A namespace and release name of this run's own. Not the `namespace` fixture: that one holds
    the CRD lock shared, and this test takes it exclusively."""
    run = uuid.uuid4().hex[:6]
    namespace = f"t-helm-lifecycle-{run}"
    kubectl(local_cluster, "create", "namespace", namespace)
    rel = HelmRelease(local_cluster, namespace, f"lc-{run}")
    yield rel
    rel.helm("uninstall", rel.name, "--ignore-not-found", "--wait", "--timeout=60s", check=False)
    rel.kubectl("delete", "qlorajobs", "--all", "--wait=false", check=False)
    kubectl(local_cluster, "delete", "namespace", namespace, "--wait=false", check=False)


def apply_job(rel: HelmRelease, name: str, steps: int, extra_spec: dict | None = None) -> None:
    spec = merge(merge({"training": {"maxSteps": steps}}, FAKE), extra_spec or {})
    rel.kubectl("apply", "-f", "-", input=json.dumps(qlorajob_manifest(name, rel.namespace, spec)))


def wait_for_job_name(rel: HelmRelease, name: str, timeout: float = 30) -> str:
    """The trainer Job the operator made for `name` (it makes one even while no GPU is free)."""
    deadline = time.monotonic() + timeout
    while not (job_name := rel.get("qlorajob", name).get("status", {}).get("jobName")):
        assert time.monotonic() < deadline, f"the operator made no trainer Job for {name}\n{rel.operator_log()}"
        time.sleep(0.5)
    return job_name


class Steps:
    """Seconds each step took, printed at the end (`pytest -s` shows them)."""

    def __init__(self):
        self.last, self.took = time.monotonic(), {}

    def done(self, step: str) -> None:
        now = time.monotonic()
        self.took[step], self.last = round(now - self.last, 1), now


def phase(rel: HelmRelease, job: str) -> str | None:
    return rel.get("qlorajob", job).get("status", {}).get("phase")


def wait_for(rel: HelmRelease, condition: str, *jobs: str, timeout: int = 60) -> None:
    waited = rel.kubectl("wait", f"--for=condition={condition}", *(f"qlorajob/{j}" for j in jobs),
                         f"--timeout={timeout}s", check=False)
    assert waited.returncode == 0, f"{waited.stderr}\n{rel.operator_log()}"


def condition_time(job: dict, kind: str) -> datetime:
    stamp = next(c["lastTransitionTime"] for c in job["status"]["conditions"] if c["type"] == kind)
    return datetime.fromisoformat(stamp.replace("Z", "+00:00"))


def spec_properties(crd: dict) -> set[crd_schema.Path]:
    return set(crd_schema.properties(crd_schema.spec_schema(crd)))


def test_upgrade_from_the_previous_release_keeps_jobs_running_then_rollback_and_uninstall(
        local_cluster, release, s3):
    rel = release
    old_crd, new_crd = previous_release.rendered_crd(), shared_crd.working_tree_document()
    added = crd_schema.new_properties(old_crd, new_crd)
    assert added, ("the working tree's CRD has no spec property that the previous release's lacks: this "
                   "test upgrades across a schema change (see tests/previous_release/README.md)")
    new_field = added[0]
    rel.kubectl("create", "secret", "generic", "s3",
                "--from-literal=AWS_ACCESS_KEY_ID=test", "--from-literal=AWS_SECRET_ACCESS_KEY=test-secret")

    wait_for_the_gpu(local_cluster)  # not while holding the lock, which stops every other cluster test
    with crd_schema_lock.schema_change(local_cluster):
        wait_for_the_gpu(local_cluster)  # again: a demo takes no lock
        operator_install.apply_chart(local_cluster)  # the CRD as the other tests have it (or a first one)
        crd_uid = shared_crd.live(local_cluster)["metadata"]["uid"]
        steps = Steps()
        try:
            # --- install the previous release --------------------------------------------------
            # The cluster as release 0.1.0 left it: its CRD. (The CRD already exists because the
            # other tests share it; on a fresh cluster helm would create it. --take-ownership lets
            # helm adopt it, and --force-conflicts its fields, which the API server's
            # "before-first-apply" manager holds after the replace.)
            shared_crd.replace(local_cluster, old_crd)
            rel.install(previous_release.CHART, "--take-ownership", "--force-conflicts")
            live = shared_crd.live(local_cluster)
            assert new_field.path not in spec_properties(live), "the previous release's CRD is installed"
            assert live["metadata"]["annotations"]["meta.helm.sh/release-name"] == rel.name
            steps.done("install previous")

            # One job training while the upgrade runs, one waiting for the node's only GPU meanwhile.
            running, queued = "before-running", "before-queued"
            apply_job(rel, running, STEPS)
            wait_for(rel, "Running", running)
            apply_job(rel, queued, 5)
            trainer_jobs = {name: rel.get("job", wait_for_job_name(rel, name))["metadata"]["uid"]
                            for name in (running, queued)}
            steps.done("jobs started")

            # --- upgrade to the working tree's chart, while they train --------------------------
            # A new operator image, as every release brings (the node agent runs any tag the same
            # way): the operator itself is replaced mid-job, whatever else the chart changed.
            operators_before = {p["metadata"]["uid"] for p in rel.operator_pods()}
            rel.upgrade(operator_install.CHART, "--set", "image.tag=next")
            upgraded_at = datetime.now(UTC).replace(microsecond=0)
            steps.done("upgrade")
            live = shared_crd.live(local_cluster)
            assert crd_schema.spec_schema(live) == crd_schema.spec_schema(new_crd), "helm upgrade updated the CRD"
            assert phase(rel, running) == "Running", "the upgrade happened mid-training"
            operators_after = rel.operator_pods()
            assert operators_after and not operators_before & {p["metadata"]["uid"] for p in operators_after}
            assert all(p["spec"]["containers"][0]["image"].endswith(":next") for p in operators_after)
            assert phase(rel, queued) not in ("Succeeded", "Failed")
            if "default" in new_field.schema:
                # The API server defaults stored objects as it reads them, with the new schema.
                stored = rel.get("qlorajob", running)["spec"]
                if _has_parent(stored, new_field.path):
                    assert crd_schema.lookup(stored, new_field.path) == new_field.served_default

            # A field the previous CRD did not have. kubectl validates strictly: an unknown field is refused.
            apply_job(rel, "after", 5, new_field.as_spec())
            assert crd_schema.lookup(rel.get("qlorajob", "after")["spec"], new_field.path) == new_field.served

            wait_for(rel, "Succeeded", running, queued, "after", timeout=int(STEPS * STEP_SECONDS) + 90)
            steps.done("jobs finished")
            for name, total in ((running, STEPS), (queued, 5)):
                job = rel.get("qlorajob", name)
                assert condition_time(job, "Succeeded") >= upgraded_at, f"{name} finished after the upgrade"
                status = job["status"]
                assert rel.get("job", status["jobName"])["metadata"]["uid"] == trainer_jobs[name], \
                    f"{name} kept its trainer Job through the upgrade (no restart, no second attempt)"
                assert status["progress"]["summary"] == f"{total}/{total} (100%)"
                assert status["result"]["adapterUri"].startswith(f"s3://adapters/adapters/{rel.namespace}/{name}/")

            # --- helm test: the operator answers, the CRD is established ------------------------
            tested = rel.helm("test", rel.name, "--logs", "--timeout=90s", check=False)
            assert tested.returncode == 0, tested.stdout + tested.stderr
            assert f"ok: CRD {shared_crd.NAME} is Established" in tested.stdout
            assert "answered /metrics" in tested.stdout
            _assert_test_objects_gone(rel, "pod")
            steps.done("helm test")

            # An adapter published by a job (the scripted trainer only reports a URI).
            adapter_uri = rel.get("qlorajob", running)["status"]["result"]["adapterUri"]
            bucket, _, prefix = adapter_uri.removeprefix("s3://").partition("/")
            s3.put_object(Bucket=bucket, Key=prefix + "adapter_model.safetensors", Body=b"weights" * 1000)
            etag = s3.head_object(Bucket=bucket, Key=prefix + "adapter_model.safetensors")["ETag"]

            # --- rollback to the previous release ----------------------------------------------
            rel.helm("rollback", rel.name, "1", "--wait", "--timeout=120s")
            history = rel.history()
            assert [(h["revision"], h["status"]) for h in history][-1] == (3, "deployed")
            assert history[-1]["description"] == "Rollback to 1"
            previous_image = f":{previous_release.app_version()}"
            assert all(p["spec"]["containers"][0]["image"].endswith(previous_image) for p in rel.operator_pods())
            steps.done("rollback")
            # The CRD is a template of the chart, so rolling back rolls it back too.
            assert new_field.path not in spec_properties(shared_crd.live(local_cluster))
            jobs = {j["metadata"]["name"]: j for j in rel.get("qlorajobs")["items"]}
            # ...and the API server prunes what that CRD does not know from the jobs it serves
            # (for good once a job is written again): the README warns about this.
            with pytest.raises(KeyError):
                crd_schema.lookup(jobs["after"]["spec"], new_field.path)
            assert {name: j["status"]["phase"] for name, j in jobs.items()} == \
                {running: "Succeeded", queued: "Succeeded", "after": "Succeeded"}

            # --- uninstall: the CRD, every QLoRAJob and the adapters stay ------------------------
            uids = {name: j["metadata"]["uid"] for name, j in jobs.items()}
            gone = rel.helm("uninstall", rel.name, "--wait", "--timeout=120s")
            assert shared_crd.NAME in gone.stdout, "helm says it kept the CRD (helm.sh/resource-policy: keep)"
            assert shared_crd.live(local_cluster)["metadata"]["uid"] == crd_uid, "the CRD was never recreated"
            left = {j["metadata"]["name"]: j for j in rel.get("qlorajobs")["items"]}
            assert {name: j["metadata"]["uid"] for name, j in left.items()} == uids
            assert all(j["status"]["phase"] == "Succeeded" for j in left.values())
            for kind in ("deployment", "clusterrole", "clusterrolebinding"):
                assert "NotFound" in rel.kubectl("get", kind, rel.fullname, check=False).stderr
            kept = s3.get_object(Bucket=bucket, Key=prefix + "adapter_model.safetensors")
            assert kept["ETag"] == etag and kept["Body"].read() == b"weights" * 1000
            steps.done("uninstall")
        finally:
            rel.helm("uninstall", rel.name, "--ignore-not-found", "--wait", "--timeout=60s", check=False)
            shared_crd.restore_working_tree(local_cluster)
            steps.done("CRD restored")
    print(f"helm lifecycle, seconds per step: {steps.took}")
    assert crd_schema.spec_schema(shared_crd.live(local_cluster)) == crd_schema.spec_schema(new_crd)


def _has_parent(spec: dict, path: crd_schema.Path) -> bool:
    try:
        return isinstance(crd_schema.lookup(spec, path[:-1]), dict)
    except KeyError:
        return False


def _assert_test_objects_gone(rel: HelmRelease, *also: str) -> None:
    """The hook's ServiceAccount, roles and ConfigMap go once it has run, pass or fail (hooks are not
    part of the release: `helm uninstall` would leave a ClusterRole behind); its pod too if it passed."""
    name = f"{rel.fullname}-test"
    for kind in ("clusterrole", "clusterrolebinding", "role", "rolebinding", "serviceaccount", "configmap", *also):
        deadline = time.monotonic() + 20
        while "NotFound" not in rel.kubectl("get", kind, name, check=False).stderr:
            assert time.monotonic() < deadline, f"the helm test's {kind} {name} was left behind"
            time.sleep(0.5)


def test_helm_test_fails_when_no_operator_answers(local_cluster, namespace):
    """The hook's check can fail: the release's operator scaled to nothing."""
    operator_install.apply_chart(local_cluster)  # the CRD, applied as every other test does
    rel = HelmRelease(local_cluster, namespace, f"silent-{namespace.rsplit('-', 1)[1]}")
    rel.install(operator_install.CHART, "--set", "crds.install=false", "--set", "helmTest.timeoutSeconds=3")
    try:
        rel.kubectl("scale", f"deployment/{rel.fullname}", "--replicas=0")
        rel.kubectl("wait", "--for=delete", "pod", "-l", rel.operator_selector, "--timeout=60s")
        tested = rel.helm("test", rel.name, "--logs", "--timeout=90s", check=False)
        assert tested.returncode != 0, tested.stdout
        assert f"ok: CRD {shared_crd.NAME} is Established" in tested.stdout
        assert f"FAILED: Service {rel.namespace}/{rel.fullname}-metrics selects no ready pod" in tested.stdout
        _assert_test_objects_gone(rel)
        assert rel.get("pod", f"{rel.fullname}-test")["status"]["phase"] == "Failed", "kept for kubectl logs"
    finally:
        rel.helm("uninstall", rel.name, "--wait", "--timeout=60s", check=False)
