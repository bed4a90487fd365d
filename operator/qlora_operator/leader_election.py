"""Leader election on a coordination.k8s.io/v1 Lease, the lock Kubernetes' own controllers use.

Two or more operator replicas run; only the one holding the Lease reconciles. The others wait,
doing nothing, until the Lease is free or has gone unrenewed for `lease_duration`. The rules are
client-go's (tools/leaderelection), so the behaviour is the one platform teams already know:

- a candidate takes the Lease when it has no holder, or when the record it last saw has not
  changed for `lease_duration` by the candidate's *own* clock (no trust in other nodes' clocks);
- every write carries the resourceVersion it was derived from, so two candidates can never both
  win: the loser's update is refused with 409 Conflict;
- the leader renews every `retry_period`; if it cannot renew for `renew_deadline`
  (< lease_duration) it stops leading at once, before anyone else may take over;
- a graceful stop releases the Lease (no holder, 1 s duration), so a standby takes over within
  one `retry_period` instead of waiting `lease_duration`.

    elector = LeaderElector(LeaseLock(kube, "qlora-system", "qlora-operator"), identity="pod-a")
    if elector.acquire(stop):              # blocks until leading (True) or `stop` is set (False)
        elector.keep_renewing(on_lost=...)
        ...                                 # lead
        elector.release()
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from urllib.parse import quote

from kubernetes.client.exceptions import ApiException

log = logging.getLogger(__name__)
MICRO_TIME = "%Y-%m-%dT%H:%M:%S.%fZ"  # metav1.MicroTime


@dataclass(frozen=True)
class LeaseRecord:
    holder: str = ""
    lease_duration_seconds: int = 0
    acquire_time: str | None = None
    renew_time: str | None = None
    transitions: int = 0
    resource_version: str | None = None

    @classmethod
    def from_lease(cls, lease: dict) -> LeaseRecord:
        spec = lease.get("spec") or {}
        return cls(holder=spec.get("holderIdentity") or "",
                   lease_duration_seconds=int(spec.get("leaseDurationSeconds") or 0),
                   acquire_time=spec.get("acquireTime"), renew_time=spec.get("renewTime"),
                   transitions=int(spec.get("leaseTransitions") or 0),
                   resource_version=lease.get("metadata", {}).get("resourceVersion"))

    def to_spec(self) -> dict:
        return {"holderIdentity": self.holder or None, "leaseDurationSeconds": self.lease_duration_seconds,
                "acquireTime": self.acquire_time, "renewTime": self.renew_time,
                "leaseTransitions": self.transitions}

    def same_as(self, other: LeaseRecord | None) -> bool:
        """The same holder's same renewal: what a candidate compares to tell a live leader from a dead one."""
        return other is not None and (self.holder, self.renew_time, self.acquire_time, self.transitions) == (
            other.holder, other.renew_time, other.acquire_time, other.transitions)


def may_take(current: LeaseRecord, me: str, unchanged_for: float) -> bool:
    """Whether `me` may write itself into the Lease: it holds it already, nobody does, or the holder
    has not renewed for its whole lease duration as measured on `me`'s clock."""
    return current.holder in ("", me) or unchanged_for >= current.lease_duration_seconds


def next_record(current: LeaseRecord | None, me: str, lease_duration: int, now: datetime) -> LeaseRecord:
    stamp = now.strftime(MICRO_TIME)
    if current is not None and current.holder == me:
        return replace(current, renew_time=stamp, lease_duration_seconds=lease_duration)
    transitions = current.transitions + 1 if current is not None else 0
    return LeaseRecord(holder=me, lease_duration_seconds=lease_duration, acquire_time=stamp, renew_time=stamp,
                       transitions=transitions, resource_version=current.resource_version if current else None)


class LeaseLock:
    """Reads and writes one Lease through the operator's Kube transport (RBAC: get/create/update)."""

    def __init__(self, kube, namespace: str, name: str, timeout: float | None = None):
        # `timeout` bounds each request: a renewal hanging on a silent connection must not outlast
        # the renew deadline, or the leader would notice its loss only when the request gives up
        self.kube, self.namespace, self.name, self.timeout = kube, namespace, name, timeout
        self._collection = f"/apis/coordination.k8s.io/v1/namespaces/{quote(namespace)}/leases"

    def get(self) -> LeaseRecord | None:
        try:
            return LeaseRecord.from_lease(self.kube._call("GET", f"{self._collection}/{quote(self.name)}",
                                                             timeout=self.timeout))
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def write(self, record: LeaseRecord, create: bool) -> LeaseRecord | None:
        """Create or update (guarded by the record's resourceVersion); None when another writer won."""
        body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": self.name, "namespace": self.namespace,
                             **({} if create else {"resourceVersion": record.resource_version})},
                "spec": record.to_spec()}
        try:
            if create:
                lease = self.kube._call("POST", self._collection, body=body, timeout=self.timeout)
            else:
                lease = self.kube._call("PUT", f"{self._collection}/{quote(self.name)}", body=body,
                                        timeout=self.timeout)
        except ApiException as e:
            if e.status in (409, 404):
                return None
            raise
        return LeaseRecord.from_lease(lease)


class LeaderElector:
    def __init__(self, lock: LeaseLock, identity: str, lease_duration: float = 15.0,
                 renew_deadline: float = 10.0, retry_period: float = 2.0,
                 monotonic: Callable[[], float] = time.monotonic):
        if not retry_period < renew_deadline < lease_duration:
            raise ValueError("leader election needs retry_period < renew_deadline < lease_duration "
                             f"(got {retry_period}, {renew_deadline}, {lease_duration})")
        self.lock, self.identity = lock, identity
        self.lease_duration, self.renew_deadline, self.retry_period = lease_duration, renew_deadline, retry_period
        self.monotonic = monotonic
        self._observed: LeaseRecord | None = None
        self._observed_at = 0.0
        self._leading = threading.Event()
        self._released = threading.Event()
        self._renewer: threading.Thread | None = None

    @property
    def is_leader(self) -> bool:
        return self._leading.is_set()

    def try_acquire_or_renew(self) -> bool:
        """One round of client-go's tryAcquireOrRenew."""
        now = datetime.now(UTC)
        current = self.lock.get()
        if current is None:
            written = self.lock.write(next_record(None, self.identity, int(self.lease_duration), now), create=True)
            return self._note(written)
        if not current.same_as(self._observed):
            self._observed, self._observed_at = current, self.monotonic()
        if not may_take(current, self.identity, self.monotonic() - self._observed_at):
            return False
        written = self.lock.write(next_record(current, self.identity, int(self.lease_duration), now), create=False)
        return self._note(written)

    def _note(self, written: LeaseRecord | None) -> bool:
        if written is None:
            return False
        self._observed, self._observed_at = written, self.monotonic()
        return True

    def acquire(self, stop: threading.Event) -> bool:
        """Blocks until this candidate leads (True) or `stop` is set (False)."""
        last_holder = None
        while not stop.is_set():
            try:
                if self.try_acquire_or_renew():
                    self._leading.set()
                    log.info("%s became the leader (Lease %s/%s)", self.identity, self.lock.namespace,
                             self.lock.name)
                    return True
                holder = self._observed.holder if self._observed else None
                if holder != last_holder:
                    log.info("standing by: Lease %s/%s is held by %s", self.lock.namespace, self.lock.name, holder)
                    last_holder = holder
            except Exception as e:  # the API server is unreachable: keep trying, never lead blind
                log.warning("leader election: %s", e)
            stop.wait(self.retry_period)
        return False

    def keep_renewing(self, on_lost: Callable[[], None]) -> threading.Thread:
        """Renew every retry_period in a thread; call `on_lost` once renewal has failed for renew_deadline."""
        def renew() -> None:
            last_renewed = self.monotonic()
            while not self._released.wait(self.retry_period):
                try:
                    if self.try_acquire_or_renew():
                        last_renewed = self.monotonic()
                        continue
                    if self._observed is not None and self._observed.holder not in ("", self.identity):
                        break  # someone else holds it: we lost it already
                except Exception as e:
                    log.warning("renewing the Lease failed: %s", e)
                if self.monotonic() - last_renewed >= self.renew_deadline:
                    break
            if not self._released.is_set():
                self._leading.clear()
                log.error("%s lost the Lease %s/%s", self.identity, self.lock.namespace, self.lock.name)
                on_lost()

        thread = threading.Thread(target=renew, name="qlora-lease-renewal", daemon=True)
        thread.start()
        self._renewer = thread
        return thread

    def release(self) -> bool:
        """Give the Lease up at once (a graceful stop); True if it was ours and is now free."""
        self._released.set()
        if not self._leading.is_set():
            return False
        self._leading.clear()
        renewer = self._renewer
        if renewer is not None and renewer is not threading.current_thread():
            # a renewal still in flight would change the Lease under the write below (a conflict)
            renewer.join(self.renew_deadline)
        try:
            for _ in range(3):  # a conflict (the Lease changed since it was read): read it again
                current = self.lock.get()
                if current is None or current.holder != self.identity:
                    return False
                now = datetime.now(UTC).strftime(MICRO_TIME)
                freed = replace(current, holder="", lease_duration_seconds=1, renew_time=now, acquire_time=now)
                if self.lock.write(freed, create=False) is not None:
                    log.info("%s released the Lease %s/%s", self.identity, self.lock.namespace, self.lock.name)
                    return True
        except Exception as e:
            log.warning("could not release the Lease: %s", e)
            return False
        log.warning("could not release the Lease %s/%s: it kept changing", self.lock.namespace, self.lock.name)
        return False
