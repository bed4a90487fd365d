"""Promise 2: no lost terminal state. The API server goes away exactly as a trainer finishes; once it
is back, the QLoRAJob reaches its true terminal state within BOUND_S, and no attempt is repeated.

On a private local cluster (the shared one must never lose its API server): real etcd, API server,
Job controller, scheduler, a node agent and the scripted trainer (tests/support/fake_trainer.py,
scenario `gated`), which trains until the test releases it. The test starts the outage, then
releases the trainer, so the trainer exits (success, or a permanent BadData failure) while nothing
can report it: the node agent cannot write the pod's status, the Job controller cannot see it, the
operator cannot read pods, logs or write status. Some seconds later (CASES) the API
comes back, and the clock starts at the moment it answers again (/readyz, or the path reopened).

Two outages: the API server stopped for everyone (SIGTERM, SIGKILL after 5 s of draining), and the API server unreachable for the operator alone (its kubeconfig points at
a TCP proxy that the test cuts: connections reset, new ones refused). Two operators: the default (one
replica, no leader election) and the chart's (leader election with its timings: it exits once it
cannot renew its Lease for 10 s, and is restarted as its Deployment's pod would be).

Each case asserts: the terminal phase and reason are the true ones, within BOUND_S; one trainer Job
(`<name>-1`), `status.attempts == 1`, and the trainer ran exactly once (the scripted trainer appends a
line per run to a file the test reads, so a rerun whose pod vanished would still be counted); the
trainer's container really finished inside the outage.

    .venv/bin/pytest tests/test_promise_api_outage.py -s     # prints the measured seconds
"""

import json
import time

import pytest
import yaml
from qlora_api import ExitCode
from qlora_localcluster import operator_install
from qlora_localcluster.testing import kubectl, private_cluster
from qlora_operator import timestamps
from qlora_operator.attempts import AttemptPhase, assess_attempt
from support.fake_trainer import job_file_name
from support.objects import error_message, pod, qlorajob, result_message, terminated, trainer_job
from support.operator_process import (
    OperatorProcess,
    fake_trainer_qlorajob,
    install_crd_and_rbac,
    service_account_kubeconfig,
)
from support.outages import ApiServerStopped, OperatorCutOff, Supervised, pod_processes
from support.polling import operator_log, qlorajob_status, wait_for
from support.tcp_proxy import CuttableProxy

NAMESPACE = "outage"
LABEL = "training.qlora-operator.dev/qlorajob"
INTERVAL_S = 5.0  # the chart's reconcileIntervalSeconds
BOUND_S = 15.0  # from the API answering again to the QLoRAJob's true terminal phase (resync 5 s, twice, and margin)
CHART_LEADER_ELECTION = {"QLORA_LEADER_ELECTION": "true",  # the chart's values.yaml timings
                         "QLORA_LEADER_ELECTION_NAMESPACE": operator_install.NAMESPACE,
                         "QLORA_LEADER_ELECTION_LEASE": operator_install.LEADER_LEASE,
                         "QLORA_LEASE_DURATION_SECONDS": "15", "QLORA_RENEW_DEADLINE_SECONDS": "10",
                         "QLORA_RETRY_PERIOD_SECONDS": "2"}
MEASURED: list[str] = []


# --- what an ended pod decides before the Job controller has caught up (pure) ------------------------

def test_a_verified_publication_is_success_before_the_job_controller_marks_the_job():
    job = qlorajob()
    active = trainer_job(job)  # the Job controller has not seen the pod end yet (no Complete)
    done = pod(active, phase="Succeeded", state=terminated(0, result_message(), finished=40))
    state = assess_attempt(active, [done])
    assert state.phase == AttemptPhase.SUCCEEDED and state.result.manifest_sha256 == "ab" * 32
    assert state.finished_at == timestamps.parse(done["status"]["containerStatuses"][0]["state"]["terminated"]
                                                 ["finishedAt"])


def test_a_permanent_failure_is_final_before_the_job_controller_marks_the_job():
    job = qlorajob()
    active = trainer_job(job)
    failed = pod(active, phase="Failed", state=terminated(
        int(ExitCode.BAD_DATA), error_message("BadData", "train.jsonl line 3: no messages", int(ExitCode.BAD_DATA))))
    state = assess_attempt(active, [failed])
    assert (state.phase, state.reason, state.retryable) == (AttemptPhase.FAILED, "BadData", False)


@pytest.mark.parametrize("code", [ExitCode.STORAGE_UNAVAILABLE, ExitCode.INTERRUPTED, 0])
def test_what_the_job_may_still_retry_or_replace_waits_for_the_jobs_verdict(code):
    """A retryable failure (the next attempt is planned from the Job's verdict), an interruption (the
    Job's podFailurePolicy starts a replacement pod) and exit 0 without a manifest digest."""
    job = qlorajob()
    active = trainer_job(job)
    said = result_message(manifest=False) if code == 0 else error_message("X", "y", int(code))
    ended = pod(active, phase="Succeeded" if code == 0 else "Failed", state=terminated(int(code), said))
    state = assess_attempt(active, [ended])
    assert state.phase == AttemptPhase.RUNNING and "waiting for its Job to conclude" in state.message


# --- the promise on a private cluster ------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with private_cluster(tmp_path_factory.mktemp("api-outage")) as c:
        install_crd_and_rbac(c)
        kubectl(c, "create", "namespace", NAMESPACE)
        kubectl(c, "-n", NAMESPACE, "create", "secret", "generic", "s3",
                "--from-literal=AWS_ACCESS_KEY_ID=test", "--from-literal=AWS_SECRET_ACCESS_KEY=test-secret")
        yield c
        print("\n" + "\n".join(MEASURED))


# (name, trainer scenario, outage, operator, seconds the API stays away after the trainer exited).
# A chart operator's outage lasts past its 10 s renew deadline: it must step down.
CASES = [
    ("stopped-ok", "gated", "api-server-stopped", "default", 5),
    ("stopped-fail", "gated-fail", "api-server-stopped", "default", 5),
    ("stopped-ok-le", "gated", "api-server-stopped", "chart", 8),
    ("cut-ok-le", "gated", "operator-cut-off", "chart", 12),
    ("cut-fail", "gated-fail", "operator-cut-off", "default", 5),
]


@pytest.mark.cluster
@pytest.mark.parametrize(("name", "scenario", "outage_kind", "operator_kind", "hold"), CASES, ids=[c[0] for c in CASES])
def test_the_true_terminal_state_arrives_after_an_api_outage_and_no_attempt_is_repeated(
        cluster, tmp_path, name, scenario, outage_kind, operator_kind, hold):
    kubeconfig = service_account_kubeconfig(cluster, tmp_path / "operator.kubeconfig")
    proxy = None
    if outage_kind == "operator-cut-off":
        proxy = CuttableProxy(cluster.settings.apiserver_port)
        config = yaml.safe_load(kubeconfig.read_text())
        config["clusters"][0]["cluster"]["server"] = proxy.url
        kubeconfig.write_text(yaml.safe_dump(config))
    outage = ApiServerStopped(cluster) if proxy is None else OperatorCutOff(proxy)
    if operator_kind == "chart":
        kubectl(cluster, "-n", operator_install.NAMESPACE, "delete", "lease", operator_install.LEADER_LEASE,
                "--ignore-not-found")
    process = OperatorProcess(kubeconfig, NAMESPACE, tmp_path / "operator.log", interval=INTERVAL_S,
                              extra_env={**CHART_LEADER_ELECTION, "QLORA_POD_NAME": f"operator-{name}"}
                              if operator_kind == "chart" else None)
    operator = Supervised(process).start()
    try:
        kubectl(cluster, "apply", "-f", "-", input=fake_trainer_qlorajob(name, NAMESPACE, scenario))
        wait_for(f"{name} training", lambda: (job_status(cluster, name).get("progress") or {}).get("step", 0) >= 2,
                 60, explain=operator_log(process))
        pod = the_pod(cluster, name)
        stopping = outage.begin()
        outage_began = time.time()
        gate(cluster, name).touch()  # the trainer exits within one step (0.2 s) of this
        wait_for("the trainer's processes to exit", lambda: not pod_processes(cluster, pod["metadata"]["uid"]), 10,
                 explain=operator_log(process))
        time.sleep(hold)
        outage_ended = time.time()
        back = outage.end()
        terminal = "Succeeded" if scenario == "gated" else "Failed"
        wait_for(f"{name} {terminal}", lambda: job_status(cluster, name).get("phase") in ("Succeeded", "Failed"),
                 90, explain=operator_log(process))
        took = time.monotonic() - back
        time.sleep(1.5 * INTERVAL_S)  # another resync: nothing may start after the end

        final = job_status(cluster, name)
        assert final["phase"] == terminal, final
        failed = next((c for c in final["conditions"] if c["type"] == "Failed"), {})
        if terminal == "Failed":
            assert failed.get("status") == "True" and failed.get("reason") == "BadData", final
            assert "line 7" in failed["message"], failed
        else:
            assert final["result"]["manifestSha256"] and final["result"]["adapterUri"].endswith("/"), final
        assert final["attempts"] == 1, final
        assert children(cluster, "jobs", name) == [f"{name}-1"]
        assert len(runs(cluster, name)) == 1, runs(cluster, name)
        finished = timestamps.parse(the_pod(cluster, name)["status"]["containerStatuses"][0]["state"]["terminated"]
                                    ["finishedAt"]).timestamp()
        assert outage_began - 1 <= finished <= outage_ended, "the trainer did not finish inside the outage"
        assert took <= BOUND_S, f"{took:.1f} s from the API's return to {terminal}"
        restarts = f", operator exits {operator.exits}" if operator.exits else ""
        MEASURED.append(f"{name}: {outage.what} ({stopping}), {operator_kind} operator{restarts}: {terminal} "
                        f"{took:.1f} s after the API answered again; {outage_ended - outage_began:.0f} s without it")
        if operator_kind == "chart":  # it cannot renew for 10 s: it must have stepped down, not led blind
            assert 3 in operator.exits, (operator.exits, process.log_tail())
        else:  # no restart hides anything: the default operator rides the outage out
            assert operator.exits == [], (operator.exits, process.log_tail())
    finally:
        operator.stop()
        if proxy is not None:
            proxy.close()
        kubectl(cluster, "-n", NAMESPACE, "delete", "qlorajob", name, "--wait=false", check=False)


def job_status(cluster, name) -> dict:
    return qlorajob_status(cluster, NAMESPACE, name)


def children(cluster, kind, name) -> list[str]:
    items = json.loads(kubectl(cluster, "-n", NAMESPACE, "get", kind, "-l", f"{LABEL}={name}", "-o",
                               "json").stdout)["items"]
    return sorted(i["metadata"]["name"] for i in items)


def the_pod(cluster, name) -> dict:
    pods = json.loads(kubectl(cluster, "-n", NAMESPACE, "get", "pods", "-l", f"{LABEL}={name}", "-o",
                              "json").stdout)["items"]
    assert len(pods) == 1, [p["metadata"]["name"] for p in pods]
    return pods[0]


def scratch(cluster):
    return cluster.state_dir / "nodes" / "gpu-node-0" / "fake-trainer"  # fake_trainer.scratch_dir()


def gate(cluster, name):
    return scratch(cluster) / job_file_name(NAMESPACE, name, "release")


def runs(cluster, name) -> list[dict]:
    path = scratch(cluster) / job_file_name(NAMESPACE, name, "runs")
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
