"""The provider: runs pods as host processes (virtual-kubelet's provider interface, no Kubernetes I/O).

    create_pod / update_pod / delete_pod   start, refresh, or begin graceful termination
    get_pod_status / get_pods              what the controller reports through the API
    get_container_logs                     what the log server streams
    adopt_finished / adopt_lost            pods found after an agent restart

State lives under `<state dir>/pods/<uid>/`: `volumes/`, `containers/<name>/termination-log`,
`logs/<name>/<restartCount>.log`, and `run.json` (pids of running containers, so a restarted
agent can stop processes it can no longer watch).
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from .container_process import kill_recorded
from .logs import LogOptions, read_log
from .pod_run import LOST_MESSAGE, Outcome, PodRun, RuntimeConfig
from .status import now_status, terminated_state

log = logging.getLogger(__name__)

AGENT_RESTARTED = "NodeAgentRestarted"


class PodNotFound(LookupError):
    """The API server's pod is not (yet) known here: 404. Other LookupErrors are 400, as kubelet's."""


class ProcessProvider:
    def __init__(self, state_dir: Path, config: RuntimeConfig, notify: Callable[[str], None]):
        self.pods_dir = Path(state_dir) / "pods"
        self.pods_dir.mkdir(parents=True, exist_ok=True)
        self.config = config
        self.notify = notify
        self._runs: dict[str, PodRun] = {}
        self._lock = threading.Lock()

    def pod_dir(self, uid: str) -> Path:
        return self.pods_dir / uid

    # ---- lifecycle -----------------------------------------------------------------------------
    def knows(self, uid: str) -> bool:
        with self._lock:
            return uid in self._runs

    def create_pod(self, pod: dict) -> None:
        uid = pod["metadata"]["uid"]
        d = self.pod_dir(uid)
        d.mkdir(parents=True, exist_ok=True)
        run = PodRun(pod, d, self.config, self.notify)
        with self._lock:
            self._runs[uid] = run
        run.start()
        if pod["metadata"].get("deletionTimestamp"):
            run.update(pod)

    def update_pod(self, pod: dict) -> None:
        run = self._get(pod["metadata"]["uid"])
        if run is not None:
            run.update(pod)

    def delete_pod(self, pod: dict, grace: float) -> None:
        run = self._get(pod["metadata"]["uid"])
        if run is not None:
            run.request_stop(grace)

    def forget(self, uid: str) -> None:
        """The pod object is gone: drop it and its directory (logs included, as kubelet does)."""
        with self._lock:
            self._runs.pop(uid, None)
        shutil.rmtree(self.pod_dir(uid), ignore_errors=True)

    def collect_garbage(self, live_uids: set[str]) -> None:
        """Directories of pods deleted while no agent ran: stop their leftovers, remove them."""
        for d in self.pods_dir.iterdir():
            if d.name in live_uids or self.knows(d.name):
                continue
            self._kill_leftovers(d, d.name)
            shutil.rmtree(d, ignore_errors=True)

    def _kill_leftovers(self, pod_dir: Path, what: str) -> None:
        try:
            for name, rec in json.loads((pod_dir / "run.json").read_text()).get("running", {}).items():
                if kill_recorded(rec["pid"], rec.get("create_time", 0)):
                    log.info(
                        "pod %s: killed container %s (pid %d) left by an earlier agent",
                        what,
                        name,
                        rec["pid"],
                    )
        except (OSError, ValueError):
            pass

    def shutdown(self, grace: float, outcome: Outcome) -> None:
        """Stops every running pod (node shutdown) and waits for them."""
        with self._lock:
            runs = [r for r in self._runs.values() if not r.finished.is_set()]
        for r in runs:
            own = float(r.pod["spec"].get("terminationGracePeriodSeconds", 30))
            r.request_stop(min(grace, own), outcome)
        for r in runs:
            r.wait(grace + 10)

    # ---- queries -------------------------------------------------------------------------------
    def _get(self, uid: str) -> PodRun | None:
        with self._lock:
            return self._runs.get(uid)

    def get_pod_status(self, uid: str) -> dict | None:
        run = self._get(uid)
        return run.status() if run and not run.adopted_terminal else None

    def is_finished(self, uid: str) -> bool:
        run = self._get(uid)
        return run is not None and run.finished.is_set()

    def get_pods(self) -> list[dict]:
        with self._lock:
            return [r.pod for r in self._runs.values()]

    def _find(self, namespace: str, name: str) -> PodRun | None:
        with self._lock:
            runs = [
                r
                for r in self._runs.values()
                if r.pod["metadata"]["namespace"] == namespace and r.pod["metadata"]["name"] == name
            ]
        # a recreated pod with the same name: the newest object wins
        return runs[-1] if runs else None

    def get_container_logs(
        self, namespace: str, name: str, container: str, opts: LogOptions
    ) -> Iterator[bytes]:
        """Raises LookupError (-> 404) when the pod, container or previous instance is unknown."""
        run = self._find(namespace, name)
        if run is None:
            raise PodNotFound(f'pod "{name}" in namespace "{namespace}" is not on this node')
        slot = run.slot(container)
        if slot is None:
            raise LookupError(f'container "{container}" is not in pod "{name}"')
        with run.lock:
            count = slot.rec.restart_count
            running_now = slot.proc
        if opts.previous:
            if count == 0:
                raise LookupError(f'previous terminated container "{container}" in pod "{name}" not found')
            return read_log(run.log_path(container, count - 1), opts)
        # a container waiting to restart shows the last instance's log, as kubelet does
        path = run.log_path(container, count)
        if not path.exists() and count > 0:
            path = run.log_path(container, count - 1)
        if not path.exists() and running_now is None:
            reason = slot.rec.waiting_reason or "waiting to start"
            raise LookupError(f'container "{container}" in pod "{name}" is waiting to start: {reason}')

        def still_running() -> bool:
            p = slot.proc
            return p is running_now and p is not None and p.poll() is None

        return read_log(path, opts, still_running)

    # ---- after an agent restart ----------------------------------------------------------------
    def previously_started(self, pod: dict) -> bool:
        """Whether an earlier agent started anything for this pod (then we cannot run it again)."""
        if (self.pod_dir(pod["metadata"]["uid"]) / "run.json").exists():
            return True
        st = pod.get("status") or {}
        for cs in (st.get("containerStatuses") or []) + (st.get("initContainerStatuses") or []):
            state = cs.get("state") or {}
            if "running" in state or "terminated" in state or cs.get("lastState"):
                return True
        return False

    def adopt_finished(self, pod: dict) -> None:
        """A terminal pod from before: keep it known so its logs stay readable."""
        self._adopt(pod, lost=False)

    def adopt_lost(self, pod: dict) -> None:
        """A non-terminal pod an earlier agent started: stop leftovers, report it Failed."""
        self._kill_leftovers(self.pod_dir(pod["metadata"]["uid"]), pod["metadata"]["name"])
        self._adopt(pod, lost=True)
        self.notify(pod["metadata"]["uid"])

    def _adopt(self, pod: dict, lost: bool) -> None:
        uid = pod["metadata"]["uid"]
        run = PodRun(pod, self.pod_dir(uid), self.config, self.notify)
        st = pod.get("status") or {}
        by_name = {
            cs["name"]: cs
            for cs in (st.get("containerStatuses") or []) + (st.get("initContainerStatuses") or [])
        }
        now = now_status()
        for slot in run.slots:
            cs = by_name.get(slot.rec.name, {})
            state = cs.get("state") or {}
            rec = slot.rec
            rec.restart_count = cs.get("restartCount", 0)
            rec.image_id, rec.container_id = cs.get("imageID", ""), cs.get("containerID", "")
            rec.last_terminated = (cs.get("lastState") or {}).get("terminated")
            rec.terminated = state.get("terminated")
            if rec.terminated is None and lost:
                started = (state.get("running") or {}).get("startedAt")
                rec.terminated = terminated_state(
                    137,
                    started_at=started,
                    finished_at=now,
                    reason="ContainerStatusUnknown",
                    message=LOST_MESSAGE,
                )
            elif rec.terminated is None:
                rec.waiting_reason = (state.get("waiting") or {}).get("reason", "")
            slot.done = True
        run.start_time = st.get("startTime")
        if lost:
            run.outcome = Outcome(
                "Failed",
                AGENT_RESTARTED,
                "The node agent restarted while this pod was running; it cannot re-attach "
                "to the container processes it had started, so it stopped them.",
            )
        else:
            run.adopted_terminal = True
        run.finished.set()
        with self._lock:
            self._runs[uid] = run
