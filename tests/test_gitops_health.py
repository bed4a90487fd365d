"""GitOps health of a QLoRAJob: Argo CD's health.lua, run by a real Lua, and kstatus (Flux's health
library, built from its Go module), over statuses the operator actually wrote on the local cluster.

    .venv/bin/pytest tests/test_gitops_health.py              # health_test.yaml's cases, then the live run (~40 s)
    gitops/argocd/regenerate-testdata.sh                      # rewrite testdata/ from a live run

The live run drives real QLoRAJobs with the operator subprocess and the fake trainer through every
state a GitOps tool shows: not yet seen, suspended, unschedulable, running, a spec change the
operator has not observed yet, succeeded and failed.
"""

import json
import os
import time
import uuid
from pathlib import Path

import pytest
import yaml
from qlora_api import QLoRAJobStatus
from qlora_localcluster.testing import kubectl
from support import crd_schema_lock, kstatus
from support.argocd_lua import HealthStatus, evaluate, health_tests, load_yaml
from support.operator_process import (
    OperatorProcess,
    fake_trainer_qlorajob,
    install_crd_and_rbac,
    service_account_kubeconfig,
)
from support.shared_gpu import wait_for_the_gpu

REPO = Path(__file__).resolve().parents[1]
HEALTH_DIR = REPO / "gitops/argocd/resource_customizations/training.qlora-operator.dev/QLoRAJob"
SCRIPT = (HEALTH_DIR / "health.lua").read_text()
CASES = health_tests(HEALTH_DIR)
TESTDATA_NAMESPACE = "ml-team"  # the live run's namespace is random; testdata say this instead
HEALTH_TEST_HEADER = """\
# Argo CD's health tests for QLoRAJob (its TestLuaHealthScript reads this layout).
# testdata/ are QLoRAJobs as the operator wrote them on the local cluster, and the statuses below
# were checked against them by tests/test_gitops_health.py: gitops/argocd/regenerate-testdata.sh
# rewrites both from a live run.
"""


# --- health_test.yaml, case by case, as Argo's own runner runs it and as argocd-cm would -----------

@pytest.mark.parametrize(("input_path", "expected"), CASES, ids=[p.name for p, _ in CASES])
def test_every_health_test_case(input_path, expected):
    obj = load_yaml(input_path)
    assert evaluate(SCRIPT, obj, restricted=False) == expected  # Argo's test runner opens every library
    assert evaluate(SCRIPT, obj, restricted=True) == expected  # argocd-cm scripts get base, table, os only


def test_the_cases_are_operator_output_and_cover_every_health():
    statuses = {expected.status for _, expected in CASES}
    assert statuses == {"Progressing", "Suspended", "Healthy", "Degraded"}
    objects = [load_yaml(path) for path, _ in CASES]
    assert any(o.get("status", {}).get("observedGeneration", 0) < o["metadata"]["generation"]
               for o in objects if "status" in o), "no case with observedGeneration behind"
    for obj in objects:
        assert obj["kind"] == "QLoRAJob" and "managedFields" not in obj["metadata"]
        QLoRAJobStatus.model_validate(obj.get("status") or {})  # a status the operator's model writes


def test_a_reason_this_script_does_not_know_yet_is_progressing():
    obj = {"metadata": {"generation": 1}, "status": {"observedGeneration": 1, "phase": "Pending", "conditions": [
        {"type": "Accepted", "status": "True", "reason": "Accepted", "message": "the spec is valid"},
        {"type": "Running", "status": "False", "reason": "SomethingNew", "message": "waiting for something new"}]}}
    assert evaluate(SCRIPT, obj) == HealthStatus("Progressing", "SomethingNew: waiting for something new")


def test_a_job_queued_by_kueue_is_progressing_with_kueues_words():
    # What the operator writes while Kueue holds the trainer Job: Scheduled and Running False, reason Queued.
    said = "queued in LocalQueue team-a (Workload job-demo-1-3f2a1): couldn't assign flavors to pod set main: " \
           "insufficient unused quota for nvidia.com/gpu in flavor gpu, 1 more needed"
    conditions = [{"type": "Accepted", "status": "True", "reason": "Accepted", "message": "the spec is valid"},
                  {"type": "Scheduled", "status": "False", "reason": "Queued", "message": said},
                  {"type": "Running", "status": "False", "reason": "Queued", "message": said}]
    obj = {"metadata": {"generation": 1},
           "status": {"observedGeneration": 1, "phase": "Pending", "message": said, "conditions": conditions}}
    assert evaluate(SCRIPT, obj) == HealthStatus("Progressing", f"Queued: {said}")


def test_an_invalid_status_value_would_be_unknown_in_argo():
    assert evaluate('return {status = "Fine"}', {}) == HealthStatus("Unknown", "Lua returned an invalid health status")


# --- the live run -----------------------------------------------------------------------------------

class LiveRun:
    def __init__(self, cluster, namespace):
        self.cluster, self.ns = cluster, namespace

    def kubectl(self, *args, input=None):
        return kubectl(self.cluster, "-n", self.ns, *args, input=input)

    def apply(self, name, **kwargs):
        self.kubectl("apply", "--server-side", "-f", "-", input=fake_trainer_qlorajob(name, self.ns, **kwargs))

    def get(self, name) -> dict:
        return json.loads(self.kubectl("get", "qlorajob", name, "-o", "json").stdout)

    def wait(self, name, ctype, status="True", reason=None, timeout=90.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            obj = self.get(name)
            cond = next((c for c in obj.get("status", {}).get("conditions", []) if c["type"] == ctype), {})
            if cond.get("status") == status and reason in (None, cond.get("reason")):
                return obj
            time.sleep(0.3)
        raise AssertionError(f"no {ctype}={status} ({reason}) on {name} after {timeout} s: {obj.get('status')}")


@pytest.fixture(scope="module")
def live(local_cluster, tmp_path_factory) -> dict[str, dict]:
    """{case: the QLoRAJob as the API server returned it} for every state a GitOps tool shows."""
    with crd_schema_lock.schema_in_use(local_cluster):  # the working tree's CRD, for the whole run
        return _drive_live_states(local_cluster, tmp_path_factory)


def _drive_live_states(local_cluster, tmp_path_factory) -> dict[str, dict]:
    install_crd_and_rbac(local_cluster)
    folder = tmp_path_factory.mktemp("gitops-live")
    operator_kubeconfig = service_account_kubeconfig(local_cluster, folder / "kubeconfig")
    namespace = f"t-gitops-live-{uuid.uuid4().hex[:5]}"
    kubectl(local_cluster, "create", "namespace", namespace)
    run = LiveRun(local_cluster, namespace)
    run.kubectl("create", "secret", "generic", "s3", "--from-literal=AWS_ACCESS_KEY_ID=test",
                "--from-literal=AWS_SECRET_ACCESS_KEY=test-secret")
    operator = OperatorProcess(operator_kubeconfig, namespace, folder / "operator.log")
    seen: dict[str, dict] = {}
    try:
        run.apply("parked", suspend=True)  # before any operator runs: no status yet
        seen["new"] = run.get("parked")
        wait_for_the_gpu(local_cluster)
        operator.start()
        run.apply("nogpu", resources={"gpu": {"count": 1, "product": "NVIDIA-B200-NOT-HERE"}})
        run.apply("train", steps=30)
        run.apply("broken", scenario="bad-data")
        seen["suspended"] = run.wait("parked", "Suspended")
        seen["unschedulable"] = run.wait("nogpu", "Scheduled", "False", "Unschedulable")
        seen["running"] = run.wait("train", "Running", "True", "Training")
        operator.stop()  # a spec change while no operator runs: observedGeneration stays behind
        run.kubectl("patch", "qlorajob", "train", "--type=merge", "-p", '{"spec":{"backoffLimit":3}}')
        seen["generation-behind"] = run.get("train")
        operator.start()
        seen["succeeded"] = run.wait("train", "Succeeded")
        seen["failed"] = run.wait("broken", "Failed", reason="BadData")
    finally:
        kubectl(local_cluster, "-n", namespace, "delete", "qlorajobs", "--all", "--wait=false")
        operator.stop()
        kubectl(local_cluster, "delete", "namespace", namespace, "--wait=false")
    if os.environ.get("QLORA_ARGOCD_TESTDATA") == "write":
        write_testdata(seen, namespace)
    return seen


def said(obj: dict, ctype: str) -> str:
    cond = next(c for c in obj["status"]["conditions"] if c["type"] == ctype)
    return f"{cond['reason']}: {cond['message']}"


def condition_message(obj: dict, ctype: str) -> str:
    return next(c["message"] for c in obj["status"]["conditions"] if c["type"] == ctype)


# case: (Argo CD health, its message from the live object, kstatus status, kstatus message)
EXPECTED = {
    "new": ("Progressing", lambda o: "Waiting for the operator to accept the job",
            # kstatus has nothing to go on before the operator's first write (no observedGeneration,
            # no conditions) and calls any such custom resource Current: a gap of one reconcile.
            "Current", lambda o: "Resource is current"),
    "suspended": ("Suspended", lambda o: said(o, "Suspended"),
                  "InProgress", lambda o: condition_message(o, "Suspended")),
    "unschedulable": ("Progressing", lambda o: said(o, "Scheduled"),
                      "InProgress", lambda o: condition_message(o, "Scheduled")),
    "running": ("Progressing", lambda o: said(o, "Running"),
                "InProgress", lambda o: condition_message(o, "Running")),
    "generation-behind": ("Progressing", lambda o: "Waiting for the operator to observe generation 2 (it has seen 1)",
                          "InProgress", lambda o: "QLoRAJob generation is 2, but latest observed generation is 1"),
    "succeeded": ("Healthy", lambda o: said(o, "Succeeded"), "Current", lambda o: "Resource is Ready"),
    "failed": ("Degraded", lambda o: said(o, "Failed"), "Failed", lambda o: condition_message(o, "Failed")),
}


@pytest.mark.cluster
def test_live_states_are_what_they_claim_to_be(live):
    assert "status" not in live["new"]
    assert live["unschedulable"]["status"]["phase"] == "Pending"
    assert "nodes are available" in said(live["unschedulable"], "Scheduled")
    assert live["running"]["status"]["phase"] == "Running"
    behind = live["generation-behind"]
    assert (behind["metadata"]["generation"], behind["status"]["observedGeneration"]) == (2, 1)
    assert live["succeeded"]["status"]["result"]["adapterUri"].startswith("s3://adapters/")
    assert said(live["failed"], "Failed").startswith("BadData: ") and "line 3" in said(live["failed"], "Failed")


@pytest.mark.cluster
@pytest.mark.parametrize("case", EXPECTED)
def test_argocd_health_of_what_the_operator_wrote(live, case):
    health, message, _, _ = EXPECTED[case]
    obj = live[case]
    assert evaluate(SCRIPT, obj) == HealthStatus(health, message(obj))


@pytest.mark.cluster
@pytest.mark.parametrize("case", EXPECTED)
def test_kstatus_of_what_the_operator_wrote(live, case):
    _, _, status, message = EXPECTED[case]
    obj = live[case]
    computed = kstatus.compute(obj)
    assert (computed["status"], computed["message"]) == (status, message(obj))  # sigs.k8s.io/cli-utils
    assert computed["fluxcd"] == {"status": status, "message": message(obj)}  # Flux's fork, in Flux and Helm 4


def write_testdata(seen: dict[str, dict], namespace: str) -> None:
    """testdata/<case>.yaml from the live objects, and their cases in health_test.yaml (others kept)."""
    folder = HEALTH_DIR / "testdata"
    folder.mkdir(exist_ok=True)
    written = {}
    for case, obj in seen.items():
        obj = json.loads(json.dumps(obj).replace(namespace, TESTDATA_NAMESPACE))
        obj["metadata"].pop("managedFields", None)
        (folder / f"{case}.yaml").write_text(yaml.safe_dump(obj, sort_keys=False, width=120))
        health, message, _, _ = EXPECTED[case]
        written[f"testdata/{case}.yaml"] = {"status": health, "message": message(obj)}
    spec = load_yaml(HEALTH_DIR / "health_test.yaml") if (HEALTH_DIR / "health_test.yaml").exists() else {}
    kept = [t for t in spec.get("tests") or [] if t["inputPath"] not in written]
    tests = kept + [{"healthStatus": status, "inputPath": path} for path, status in written.items()]
    (HEALTH_DIR / "health_test.yaml").write_text(
        HEALTH_TEST_HEADER + yaml.safe_dump({"tests": tests}, sort_keys=False, width=120))
