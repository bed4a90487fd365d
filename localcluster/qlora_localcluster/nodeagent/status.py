"""Pod status as kubelet reports it, built from the runtime's view of each container. Pure functions.

Phase follows kubelet's getPhase: Pending until init containers succeed and every container has
started; Running while any runs (or will be restarted); Succeeded when all exited 0; Failed when
all stopped, one failed, and the restart policy will not restart it. Conditions: Initialized,
ContainersReady, Ready and PodReadyToStartContainers are the agent's; every other condition type
(PodScheduled from the scheduler, DisruptionTarget from eviction) is carried over untouched.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass


def now_status() -> str:
    """metav1.Time: the API server keeps whole seconds, so we send exactly what it will store."""
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


OWN_CONDITIONS = ("PodReadyToStartContainers", "Initialized", "ContainersReady", "Ready")
HOST_IP = "127.0.0.1"


@dataclass
class ContainerRecord:
    """What the runtime knows about one container; the status builders only read it."""

    name: str
    image: str
    image_id: str = ""
    container_id: str = ""
    restart_count: int = 0
    waiting_reason: str = "ContainerCreating"
    waiting_message: str = ""
    started_at: str | None = None  # set while running
    terminated: dict | None = None  # the current terminated state
    last_terminated: dict | None = None  # lastState.terminated

    @property
    def running(self) -> bool:
        return self.started_at is not None and self.terminated is None

    @property
    def succeeded(self) -> bool:
        return self.terminated is not None and self.terminated.get("exitCode") == 0


def terminated_state(
    exit_code: int,
    *,
    started_at: str | None,
    finished_at: str,
    oom: bool = False,
    signal: int | None = None,
    message: str = "",
    container_id: str = "",
    reason: str | None = None,
) -> dict:
    if reason is None:
        reason = "OOMKilled" if oom else ("Completed" if exit_code == 0 else "Error")
    state = {"exitCode": exit_code, "reason": reason, "startedAt": started_at, "finishedAt": finished_at}
    if signal:
        state["signal"] = signal
    if message:
        state["message"] = message
    if container_id:
        state["containerID"] = container_id
    return state


def container_status(rec: ContainerRecord) -> dict:
    if rec.terminated is not None:
        state = {"terminated": rec.terminated}
    elif rec.started_at is not None:
        state = {"running": {"startedAt": rec.started_at}}
    else:
        waiting = {"reason": rec.waiting_reason}
        if rec.waiting_message:
            waiting["message"] = rec.waiting_message
        state = {"waiting": waiting}
    status = {
        "name": rec.name,
        "image": rec.image,
        "imageID": rec.image_id,
        "ready": rec.running,
        "started": rec.running,
        "restartCount": rec.restart_count,
        "state": state,
        "lastState": {"terminated": rec.last_terminated} if rec.last_terminated else {},
    }
    if rec.container_id:
        status["containerID"] = rec.container_id
    return status


def pod_phase(restart_policy: str, init: list[ContainerRecord], main: list[ContainerRecord]) -> str:
    for rec in init:
        if rec.succeeded:
            continue
        failed = rec.terminated is not None or rec.last_terminated is not None
        return "Failed" if failed and restart_policy == "Never" else "Pending"
    waiting = running = stopped = succeeded = 0
    for rec in main:
        if rec.running:
            running += 1
        elif rec.terminated is not None:
            stopped += 1
            succeeded += rec.succeeded
        elif rec.last_terminated is not None:  # waiting to restart
            stopped += 1
        else:
            waiting += 1
    if waiting:
        return "Pending"
    if running:
        return "Running"
    if stopped:
        if restart_policy == "Always":
            return "Running"
        if stopped == succeeded:
            return "Succeeded"
        if restart_policy == "Never":
            return "Failed"
        return "Running"
    return "Pending"


def _condition(
    old: dict[str, dict], ctype: str, ok: bool, now: str, reason: str = "", message: str = ""
) -> dict:
    status = "True" if ok else "False"
    prev = old.get(ctype)
    since = (
        prev["lastTransitionTime"]
        if prev and prev.get("status") == status and prev.get("lastTransitionTime")
        else now
    )
    cond = {"type": ctype, "status": status, "lastProbeTime": None, "lastTransitionTime": since}
    if not ok and reason:
        cond["reason"] = reason
    if not ok and message:
        cond["message"] = message
    return cond


def pod_conditions(
    old_conditions: list[dict],
    init: list[ContainerRecord],
    main: list[ContainerRecord],
    phase: str,
    sandbox_ready: bool,
    now: str,
) -> list[dict]:
    old = {c["type"]: c for c in old_conditions or []}
    pending_init = [r.name for r in init if not r.succeeded]
    unready = [r.name for r in main if not r.running]
    completed = phase in ("Succeeded", "Failed")
    init_ok = not pending_init or phase == "Succeeded"
    init_reason = "ContainersNotInitialized"
    unready_reason = "PodCompleted" if completed else "ContainersNotReady"
    unready_msg = "" if completed else f"containers with unready status: [{' '.join(unready)}]"
    own = [
        _condition(old, "PodReadyToStartContainers", sandbox_ready and not completed, now),
        _condition(
            old,
            "Initialized",
            init_ok,
            now,
            init_reason,
            f"containers with incomplete status: [{' '.join(pending_init)}]",
        ),
        _condition(old, "ContainersReady", not unready, now, unready_reason, unready_msg),
        _condition(old, "Ready", not unready, now, unready_reason, unready_msg),
    ]
    if completed and init_ok and not pending_init:
        own[1].pop("reason", None)
    foreign = [c for c in old_conditions or [] if c["type"] not in OWN_CONDITIONS]
    return foreign + own


def build_pod_status(
    pod: dict,
    init: list[ContainerRecord],
    main: list[ContainerRecord],
    *,
    start_time: str | None,
    now: str,
    sandbox_ready: bool = True,
    phase: str | None = None,
    reason: str | None = None,
    message: str | None = None,
) -> dict:
    """The full `status` to send as a merge patch (lists replace, None clears)."""
    restart_policy = pod["spec"].get("restartPolicy", "Always")
    phase = phase or pod_phase(restart_policy, init, main)
    old = pod.get("status") or {}
    status = {
        "phase": phase,
        "conditions": pod_conditions(old.get("conditions") or [], init, main, phase, sandbox_ready, now),
        "hostIP": HOST_IP,
        "hostIPs": [{"ip": HOST_IP}],
        "podIP": HOST_IP,
        "podIPs": [{"ip": HOST_IP}],
        "startTime": start_time,
        "containerStatuses": [container_status(r) for r in main],
        "initContainerStatuses": [container_status(r) for r in init] if init else None,
        "reason": reason,
        "message": message,
    }
    return status


def is_terminal(phase: str | None) -> bool:
    return phase in ("Succeeded", "Failed")
