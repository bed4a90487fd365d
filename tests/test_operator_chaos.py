"""Promise 1: one Job per attempt, whatever moment the operator dies at.

The operator is SIGKILLed over and over (at least 100 times, at seeded random moments: while it
starts, while it creates Jobs, while it writes status) as a dozen QLoRAJobs live their lives with
the scripted trainer: some succeed, some fail permanently, some fail once and succeed on a retry.
Afterwards, with one operator left running: every job reaches its right terminal status, and its
trainer Jobs are exactly <name>-1 .. <name>-<attempts>, one per attempt.

    QLORA_CHAOS_SEED=7 .venv/bin/pytest tests/test_operator_chaos.py    # another reproducible run
"""

import json
import os
import random
import time
import urllib.request

import pytest
from qlora_localcluster.testing import kubectl
from support.operator_process import OperatorProcess, install_crd_and_rbac, service_account_kubeconfig
from support.shared_gpu import wait_for_the_gpu

pytestmark = pytest.mark.cluster
LABEL = "training.qlora-operator.dev/qlorajob"
SEED = int(os.environ.get("QLORA_CHAOS_SEED", "20261130"))
KILLS = 100
# scenario of the scripted trainer -> (final phase, Failed reason, attempts)
EXPECTED = {"succeed": ("Succeeded", None, 1), "bad-data": ("Failed", "BadData", 1), "flaky": ("Succeeded", None, 2)}


def manifest(namespace: str, name: str, scenario: str, steps: int) -> str:
    return json.dumps({"apiVersion": "training.qlora-operator.dev/v1alpha1", "kind": "QLoRAJob",
                       "metadata": {"name": name, "namespace": namespace},
                       "spec": {"model": {"uri": f"hf://fake/{scenario}"}, "dataset": {"uri": "s3://datasets/x.jsonl"},
                                "output": {"bucket": "adapters"}, "training": {"maxSteps": steps},
                                "backoffLimit": 2, "resources": {"image": "qlora-fake-trainer:test"}}})


def qlorajobs(cluster, namespace) -> dict[str, dict]:
    items = json.loads(kubectl(cluster, "-n", namespace, "get", "qlorajobs", "-o", "json").stdout)["items"]
    return {i["metadata"]["name"]: i.get("status") or {} for i in items}


def trainer_jobs(cluster, namespace) -> dict[str, list[str]]:
    items = json.loads(kubectl(cluster, "-n", namespace, "get", "jobs", "-o", "json").stdout)["items"]
    found: dict[str, list[str]] = {}
    for item in items:
        found.setdefault(item["metadata"]["labels"][LABEL], []).append(item["metadata"]["name"])
    return {k: sorted(v) for k, v in found.items()}


def is_serving(operator: OperatorProcess) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{operator.health_port}/healthz", timeout=0.2) as r:
            return r.status == 200
    except OSError:
        return False


def test_the_operator_killed_100_times_leaves_one_job_per_attempt_and_the_right_status(
        local_cluster, namespace, tmp_path):
    rng = random.Random(SEED)
    wait_for_the_gpu(local_cluster)
    install_crd_and_rbac(local_cluster)
    kubeconfig = service_account_kubeconfig(local_cluster, tmp_path / "operator.kubeconfig")
    operator = OperatorProcess(kubeconfig, namespace, tmp_path / "operator.log", interval=0.5)
    scenarios = {f"chaos-{i}": rng.choice(["succeed", "succeed", "flaky", "bad-data"]) for i in range(12)}
    for name, scenario in scenarios.items():
        kubectl(local_cluster, "apply", "-f", "-", input=manifest(namespace, name, scenario, rng.randint(3, 12)))
    started, serving = time.monotonic(), 0
    try:
        for kill in range(KILLS):
            operator.start(wait=False)
            # Short lives (killed while starting or mid-reconcile) and longer ones, so that the jobs
            # move on between kills. A longer life is counted from the moment the operator serves
            # (0-2 s into its work, as 1.5-3.5 s from its start is on an idle machine): on a loaded
            # one its start alone can take longer than that, and every kill would hit a start-up.
            if kill % 3 == 2:
                operator.wait_healthy(timeout=60)
                time.sleep(rng.uniform(0.0, 2.0))
            else:
                time.sleep(rng.uniform(0.1, 1.5))
            serving += is_serving(operator)
            operator.kill9()
        killing = time.monotonic() - started
        operator.start()
        deadline = time.monotonic() + 240
        while True:
            current = qlorajobs(local_cluster, namespace)
            if all(s.get("phase") in ("Succeeded", "Failed") for s in current.values()):
                break
            assert time.monotonic() < deadline, (current, operator.log_tail())
            time.sleep(1)
        time.sleep(2)  # a few more resyncs: nothing may be created after the end
        current, jobs = qlorajobs(local_cluster, namespace), trainer_jobs(local_cluster, namespace)
        wrong = []
        for name, scenario in scenarios.items():
            phase, reason, attempts = EXPECTED[scenario]
            status = current[name]
            failed = next((c["reason"] for c in status.get("conditions", []) if c["type"] == "Failed"), None)
            expected_jobs = [f"{name}-{n}" for n in range(1, attempts + 1)]
            if (status.get("phase"), failed, status.get("attempts"), jobs.get(name)) != (
                    phase, reason, attempts, expected_jobs):
                wrong.append(f"{name} ({scenario}): {status.get('phase')} {failed} attempts={status.get('attempts')} "
                             f"jobs={jobs.get(name)}")
        assert not wrong, "\n".join(wrong)
        assert not [line for line in operator.errors_in_log() if "Traceback" in line], operator.log_tail()
        assert serving >= 25, f"only {serving} kills hit a running operator"  # not only kills during start-up
        print(f"{KILLS} SIGKILLs ({serving} of a serving operator) in {killing:.0f} s (seed {SEED}); all "
              f"{len(scenarios)} jobs right "
              f"{time.monotonic() - started:.0f} s after the first")
    finally:
        kubectl(local_cluster, "-n", namespace, "delete", "qlorajobs", "--all", "--wait=false", check=False)
        operator.stop()
