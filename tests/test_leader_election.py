"""Two operator replicas, one leader: the Lease rules without a server, two electors racing on the
real API server, and the failover a platform team relies on (the leader SIGKILLed mid-job, the
standby taking over, the job finishing with one Job and one pod; a graceful stop releasing the
Lease at once)."""

import json
import signal
import threading
import time
from dataclasses import replace
from datetime import UTC, datetime

import pytest
from kubernetes.client.exceptions import ApiException
from qlora_localcluster import operator_install
from qlora_localcluster.testing import kubectl
from qlora_operator import settings
from qlora_operator.kube import Kube
from qlora_operator.leader_election import LeaderElector, LeaseLock, LeaseRecord, may_take, next_record
from support.operator_process import OperatorProcess, fake_trainer_qlorajob
from support.polling import wait_for
from support.shared_gpu import wait_for_the_gpu

# --- the rules, no server ----------------------------------------------------------------------


def test_a_live_holder_keeps_the_lease_and_a_silent_one_loses_it():
    held = LeaseRecord(holder="a", lease_duration_seconds=15)
    assert may_take(held, "a", unchanged_for=0)  # renewing our own
    assert not may_take(held, "b", unchanged_for=14.9)
    assert may_take(held, "b", unchanged_for=15.0)
    assert may_take(LeaseRecord(holder="", lease_duration_seconds=1), "b", unchanged_for=0)  # released


def test_records_count_transitions_and_keep_the_acquire_time_on_renewal():
    t0, t1 = datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 1, 1, 0, 0, 5, tzinfo=UTC)
    first = next_record(None, "a", 15, t0)
    assert (first.holder, first.transitions, first.acquire_time) == ("a", 0, "2026-01-01T00:00:00.000000Z")
    renewed = next_record(first, "a", 15, t1)
    assert renewed.acquire_time == first.acquire_time and renewed.renew_time == "2026-01-01T00:00:05.000000Z"
    assert renewed.transitions == 0
    taken = next_record(renewed, "b", 15, t1)
    assert (taken.holder, taken.transitions, taken.acquire_time) == ("b", 1, taken.renew_time)


class _RecordingKube:
    """Kube's transport, answering a Lease's GET with 404 and recording each request's timeout."""

    def __init__(self):
        self.timeouts = []

    def _call(self, method, path, *, body=None, timeout=None, **_):
        self.timeouts.append((method, timeout))
        if method == "GET":
            raise ApiException(status=404)
        return {**body, "metadata": {**body["metadata"], "resourceVersion": "1"}}


def test_the_operators_lease_requests_give_up_within_half_the_renew_deadline():
    """A renewal hanging on a silent connection (the transport's 30 s) would outlast the renew
    deadline, and the leader would step down only when it gave up: a CI run saw a leader cut off
    from the API for 12 s never step down. Every Lease request is bounded by half the deadline."""
    from qlora_operator.leadership import elector_for

    kube = _RecordingKube()
    config = settings.parse([], environ={"QLORA_LEADER_ELECTION": "true", "QLORA_POD_NAME": "op-1",
                                         "QLORA_RENEW_DEADLINE_SECONDS": "10"})
    assert elector_for(kube, config).try_acquire_or_renew()
    assert kube.timeouts == [("GET", 5.0), ("POST", 5.0)]


class _MemoryLock:
    """A Lease in memory with the API server's optimistic concurrency: a write carrying an older
    resourceVersion is refused (None, as LeaseLock.write answers a 409). `before_write` runs just
    before each write is judged, to slip a competing write in."""

    namespace, name = "ns", "lease"

    def __init__(self):
        self.record, self.version, self.before_write = None, 0, None

    def get(self):
        return None if self.record is None else replace(self.record, resource_version=str(self.version))

    def write(self, record, create):
        if self.before_write is not None:
            hook, self.before_write = self.before_write, None
            hook()
        if (self.record is None) != create or (not create and record.resource_version != str(self.version)):
            return None
        self.version += 1
        self.record = replace(record, resource_version=None)
        return self.get()


def test_a_release_that_meets_its_own_last_renewal_reads_again_and_frees_the_lease():
    """The race a loaded CI machine showed: the holder's renewal lands between release's read and
    its write, so the first write is refused as a conflict. Release reads the Lease again (still
    ours) and frees it; a standby may then take it at once."""
    lock = _MemoryLock()
    a = LeaderElector(lock, "a", lease_duration=4, renew_deadline=3, retry_period=0.3)
    assert a.acquire(threading.Event())
    lock.before_write = lambda: lock.write(next_record(lock.get(), "a", 4, datetime.now(UTC)), create=False)
    assert a.release()
    assert lock.record.holder == "" and lock.version == 3  # taken, renewed, freed
    assert LeaderElector(lock, "b", lease_duration=4, renew_deadline=3, retry_period=0.3).try_acquire_or_renew()


def test_a_release_while_a_renewal_is_in_flight_frees_the_lease():
    """keep_renewing's thread may be inside a renewal when release is called, its write reaching
    the server only after release has read the Lease: release lets the renewal finish before it
    reads (and would read again after a conflict), so it frees the Lease all the same."""
    lock = _MemoryLock()
    a = LeaderElector(lock, "a", lease_duration=4, renew_deadline=3, retry_period=0.05)
    assert a.acquire(threading.Event())
    renewing, committed = threading.Event(), threading.Event()
    original = lock.write

    def slow_write(record, create):
        if record.holder == "a":  # a renewal, in flight for a while
            renewing.set()
            time.sleep(0.3)
            written = original(record, create)
            committed.set()
            return written
        committed.wait(5)  # the release's write reaches the server after the renewal's
        return original(record, create)

    lock.write = slow_write
    a.keep_renewing(on_lost=lambda: None)
    assert renewing.wait(5)
    assert a.release()
    assert lock.record.holder == ""


def test_the_charts_variables_and_flags_turn_election_on():
    config = settings.parse([], environ={"QLORA_LEADER_ELECTION": "true", "QLORA_POD_NAME": "op-7d9f",
                                         "QLORA_LEADER_ELECTION_NAMESPACE": "qlora-system",
                                         "QLORA_LEASE_DURATION_SECONDS": "20"})
    assert (config.leader_election, config.leader_election_identity, config.leader_election_namespace,
            config.lease_duration) == (True, "op-7d9f", "qlora-system", 20.0)
    assert not settings.parse([], environ={"QLORA_LEADER_ELECTION": "false"}).leader_election
    assert settings.parse(["--leader-elect", "--retry-period", "1"], environ={}).retry_period == 1.0
    with pytest.raises(SystemExit, match="QLORA_LEADER_ELECTION='maybe'"):
        settings.parse([], environ={"QLORA_LEADER_ELECTION": "maybe"})


@pytest.mark.parametrize("var,raw,complaint", [
    ("QLORA_RECONCILE_WORKERS", "many", "expected an integer"),
    ("QLORA_RECONCILE_WORKERS", "0", "at least 1 reconcile worker"),
    ("QLORA_RECONCILE_INTERVAL_SECONDS", "soon", "expected a number"),
    ("QLORA_RECONCILE_INTERVAL_SECONDS", "0", "expected seconds > 0"),
])
def test_bad_operator_settings_stop_it_with_the_variable_named(var, raw, complaint):
    with pytest.raises(SystemExit, match=f"{var}=.*{complaint}"):
        settings.parse([], environ={var: raw})
    assert settings.parse([], environ={"QLORA_RECONCILE_WORKERS": "32"}).reconcile_workers == 32


def test_inconsistent_durations_are_refused():
    with pytest.raises(ValueError, match="retry_period < renew_deadline < lease_duration"):
        LeaderElector(lock=None, identity="a", lease_duration=5, renew_deadline=5, retry_period=1)


# --- two electors on the real API server ---------------------------------------------------------


@pytest.fixture
def admin_kube(local_cluster, monkeypatch):
    from kubernetes import config
    monkeypatch.setenv("KUBECONFIG", str(local_cluster.kubeconfig))
    return Kube(config.new_client_from_config(config_file=str(local_cluster.kubeconfig)))


@pytest.mark.cluster
def test_only_one_of_two_candidates_leads_and_a_release_hands_over_at_once(admin_kube, namespace):
    lock = LeaseLock(admin_kube, namespace, "race")
    a = LeaderElector(lock, "a", lease_duration=4, renew_deadline=3, retry_period=0.3)
    b = LeaderElector(lock, "b", lease_duration=4, renew_deadline=3, retry_period=0.3)
    assert a.acquire(threading.Event())
    assert not b.try_acquire_or_renew()  # held, and renewed just now
    lost = threading.Event()
    a.keep_renewing(on_lost=lost.set)
    stop_b = threading.Event()
    threading.Timer(6, stop_b.set).start()
    assert not b.acquire(stop_b), "b took a Lease that a kept renewing"
    assert not lost.is_set()

    assert a.release()
    assert lock.get().holder == ""
    started = time.monotonic()
    assert b.acquire(threading.Event())
    assert time.monotonic() - started < 1.0  # one retry period, not a lease duration
    assert lock.get().holder == "b" and lock.get().transitions == 1  # a created it (0), b took it (1)


@pytest.mark.cluster
def test_a_leader_that_cannot_renew_steps_down_before_anyone_may_take_over(admin_kube, namespace):
    lock = LeaseLock(admin_kube, namespace, "silent")
    a = LeaderElector(lock, "a", lease_duration=4, renew_deadline=2, retry_period=0.3)
    assert a.acquire(threading.Event())
    # b takes the Lease by force (as if a's renewals had not reached the server for a while).
    current = lock.get()
    lock.write(LeaseRecord(holder="b", lease_duration_seconds=4, acquire_time=current.renew_time,
                           renew_time=current.renew_time, transitions=current.transitions + 1,
                           resource_version=current.resource_version), create=False)
    lost = threading.Event()
    a.keep_renewing(on_lost=lost.set)
    assert lost.wait(3), "a went on leading on a Lease someone else holds"
    assert not a.is_leader and lock.get().holder == "b"


# --- the operator's replicas as real processes -----------------------------------------------------


def lease(cluster) -> dict:
    result = kubectl(cluster, "-n", operator_install.NAMESPACE, "get", "lease", operator_install.LEADER_LEASE,
                     "-o", "json", check=False)
    return json.loads(result.stdout)["spec"] if result.returncode == 0 else {}


@pytest.fixture
def replicas(local_cluster, namespace, tmp_path):
    """Two operator replicas watching `namespace`, authenticated as the chart's ServiceAccount
    (whose Role grants the Lease), with the chart's default timings."""
    wait_for_the_gpu(local_cluster)
    operator_install.apply_chart(local_cluster)
    kubeconfig = operator_install.service_account_kubeconfig(local_cluster, tmp_path / "kubeconfig")
    kubectl(local_cluster, "-n", operator_install.NAMESPACE, "delete", "lease", operator_install.LEADER_LEASE,
            "--ignore-not-found")
    kubectl(local_cluster, "-n", namespace, "create", "secret", "generic", "s3",
            "--from-literal=AWS_ACCESS_KEY_ID=test", "--from-literal=AWS_SECRET_ACCESS_KEY=test-secret")
    made = {identity: OperatorProcess(kubeconfig, namespace, tmp_path / f"{identity}.log", extra_env={
        "QLORA_LEADER_ELECTION": "true",
        "QLORA_LEADER_ELECTION_NAMESPACE": operator_install.NAMESPACE,
        "QLORA_LEADER_ELECTION_LEASE": operator_install.LEADER_LEASE,
        "QLORA_POD_NAME": identity}) for identity in ("replica-a", "replica-b")}
    yield made
    kubectl(local_cluster, "-n", namespace, "delete", "qlorajobs", "--all", "--wait=false", check=False)
    for operator in made.values():
        operator.stop()


@pytest.mark.cluster
def test_the_standby_finishes_a_killed_leaders_job_within_30_seconds(local_cluster, namespace, replicas):
    a, b = replicas["replica-a"].start(), None
    wait_for("replica-a leading", lambda: lease(local_cluster).get("holderIdentity") == "replica-a", 10)
    b = replicas["replica-b"].start()  # answers /healthz while standing by
    qlorajob = fake_trainer_qlorajob("failover", namespace, steps=150)  # 30 s of training
    kubectl(local_cluster, "apply", "-f", "-", input=qlorajob)

    def status():
        return json.loads(kubectl(local_cluster, "-n", namespace, "get", "qlorajob", "failover", "-o",
                                  "json").stdout).get("status") or {}
    wait_for("training progress", lambda: (status().get("progress") or {}).get("step", 0) >= 3, 60)
    assert "became the leader" not in b.log_path.read_text(), "the standby acted before holding the Lease"
    assert "JobCreated" not in b.log_path.read_text() and "create Job" not in b.log_path.read_text()

    killed_at = time.monotonic()
    a.kill9()
    wait_for("replica-b leading", lambda: lease(local_cluster).get("holderIdentity") == "replica-b", 30)
    takeover = time.monotonic() - killed_at
    print(f"takeover after SIGKILL: {takeover:.1f} s")
    assert takeover < 30

    wait_for("Succeeded", lambda: status().get("phase") in ("Succeeded", "Failed"), 90)
    final = status()
    assert final["phase"] == "Succeeded", final
    assert final["attempts"] == 1

    def jobs():
        return json.loads(kubectl(local_cluster, "-n", namespace, "get", "jobs", "-o", "json").stdout)["items"]
    assert [j["metadata"]["name"] for j in jobs()] == ["failover-1"]
    # The QLoRAJob reports a verified publication from the ended pod; the Job controller follows.
    wait_for("the Job's success", lambda: jobs()[0]["status"].get("succeeded") == 1, 30)
    assert not jobs()[0]["status"].get("failed")
    events = json.loads(kubectl(local_cluster, "-n", namespace, "get", "events", "-o", "json").stdout)["items"]
    assert [e["reason"] for e in events].count("JobCreated") == 1
    assert (final["result"].get("resumedFromStep") or 0) == 0  # the trainer never restarted: one upload

    # A graceful stop releases the Lease at once: no holder within a second or two, not 15 s.
    stopped_at = time.monotonic()
    b.proc.send_signal(signal.SIGTERM)
    wait_for("the Lease released", lambda: lease(local_cluster).get("holderIdentity") is None and
             lease(local_cluster).get("leaseTransitions") is not None, 10)
    released = time.monotonic() - stopped_at
    print(f"Lease released {released:.1f} s after SIGTERM")
    assert released < 5
    assert b.proc.wait(20) == 0
    assert not b.errors_in_log() and not a.errors_in_log()
