"""The life of one pod on this node: volumes, init containers in order, then the containers.

One thread per pod drives a small loop every half second: start what may start, collect exits,
apply the restart policy with kubelet's back-off (10 s doubling to 5 min), kill containers over
their memory limit (reported OOMKilled, exit 137) and the whole pod past activeDeadlineSeconds
(Failed, DeadlineExceeded). A stop request (deletion, eviction, node shutdown) SIGTERMs every
container's process group, waits out the grace period and SIGKILLs what is left.
"""

from __future__ import annotations

import json
import logging
import shutil
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .container_process import ContainerProcess, Exit
from .image_table import ImageNotInTable, ImageTable
from .launch import ContainerConfigError, build_launch
from .logs import LogOptions, read_log
from .quantity import parse_quantity
from .status import ContainerRecord, build_pod_status, now_status, terminated_state
from .volumes import VolumeError, materialize

log = logging.getLogger(__name__)

TICK = 0.5
MAX_TERMINATION_MESSAGE = 4096
FALLBACK_LOG_LINES, FALLBACK_LOG_BYTES = 80, 2048
LOST_MESSAGE = "The container could not be located when the pod was terminated"


def backoff_seconds(failures: int, initial: float = 10.0, cap: float = 300.0) -> float:
    return min(initial * 2 ** max(failures - 1, 0), cap)


def termination_message(path: Path, policy: str, exit_code: int, log_path: Path) -> str:
    try:
        with open(path, "rb") as f:
            message = f.read(MAX_TERMINATION_MESSAGE).decode("utf-8", errors="replace")
    except OSError:
        message = ""
    if not message and policy == "FallbackToLogsOnError" and exit_code != 0:
        tail = b"".join(read_log(log_path, LogOptions(tail_lines=FALLBACK_LOG_LINES)))
        message = tail[-FALLBACK_LOG_BYTES:].decode("utf-8", errors="replace")
    return message


@dataclass
class RuntimeConfig:
    images: ImageTable
    reader: object  # ResourceReader + VolumeSourceReader
    pass_env: list[str]
    api_server: str = ""  # written into the kubeconfig of pods with a ServiceAccount token (in_cluster.py)


@dataclass
class Slot:
    spec: dict
    rec: ContainerRecord
    init: bool
    proc: ContainerProcess | None = None
    next_start: float = 0.0
    crashes: int = 0
    pull_failures: int = 0
    done: bool = False  # exited and will not be restarted
    oom: bool = False
    term_host_path: Path | None = None

    @property
    def memory_limit(self) -> float | None:
        limit = (self.spec.get("resources") or {}).get("limits", {}).get("memory")
        return parse_quantity(limit) if limit else None


@dataclass
class Outcome:
    phase: str
    reason: str | None = None
    message: str | None = None


class PodRun:
    def __init__(self, pod: dict, pod_dir: Path, config: RuntimeConfig, notify: Callable[[str], None]):
        self.pod = pod
        self.uid = pod["metadata"]["uid"]
        self.dir = pod_dir
        self.config = config
        self._notify_cb = notify
        self.lock = threading.RLock()
        spec = pod["spec"]
        first_wait = "PodInitializing" if spec.get("initContainers") else "ContainerCreating"
        self.slots = [
            Slot(c, ContainerRecord(c["name"], c.get("image", ""), waiting_reason="PodInitializing"), True)
            for c in spec.get("initContainers") or []
        ]
        self.slots += [
            Slot(c, ContainerRecord(c["name"], c.get("image", ""), waiting_reason=first_wait), False)
            for c in spec.get("containers") or []
        ]
        self.start_time: str | None = None
        self.volume_paths: dict[str, str] = {}
        self.sandbox_ready = False
        self.outcome: Outcome | None = None  # set when the agent decides the phase itself
        self.finished = threading.Event()
        self.adopted_terminal = False  # terminal before this agent started: never re-reported
        self._wake = threading.Event()
        self._stop: tuple[float, Outcome | None] | None = None
        self._started_mono = 0.0
        self._thread: threading.Thread | None = None

    # ---- the interface the provider uses -------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._main, name=f"pod-{self.name}", daemon=True)
        self._thread.start()

    @property
    def name(self) -> str:
        return f"{self.pod['metadata']['namespace']}/{self.pod['metadata']['name']}"

    def update(self, pod: dict) -> None:
        with self.lock:
            self.pod = pod
        if pod["metadata"].get("deletionTimestamp"):
            grace = pod["metadata"].get("deletionGracePeriodSeconds")
            if grace is None:
                grace = pod["spec"].get("terminationGracePeriodSeconds", 30)
            self.request_stop(float(grace))
        self._wake.set()

    def request_stop(self, grace: float, outcome: Outcome | None = None) -> None:
        with self.lock:
            if self._stop is None or grace < self._stop[0]:
                self._stop = (grace, outcome or (self._stop[1] if self._stop else None))
        self._wake.set()

    def status(self) -> dict:
        with self.lock:
            init = [s.rec for s in self.slots if s.init]
            main = [s.rec for s in self.slots if not s.init]
            o = self.outcome
            return build_pod_status(
                self.pod,
                init,
                main,
                start_time=self.start_time,
                now=now_status(),
                sandbox_ready=self.sandbox_ready,
                phase=o.phase if o else None,
                reason=o.reason if o else None,
                message=o.message if o else None,
            )

    def slot(self, container: str) -> Slot | None:
        return next((s for s in self.slots if s.rec.name == container), None)

    def log_path(self, container: str, restart_count: int) -> Path:
        return self.dir / "logs" / container / f"{restart_count}.log"

    def wait(self, timeout: float | None = None) -> bool:
        return self.finished.wait(timeout)

    # ---- the pod thread ------------------------------------------------------------------------
    def _notify(self) -> None:
        self._notify_cb(self.uid)

    def _main(self) -> None:
        try:
            with self.lock:
                self.start_time = (self.pod.get("status") or {}).get("startTime") or now_status()
            self._started_mono = time.monotonic()
            self._notify()
            if self._prepare_volumes():
                while self._stop is None and not self._deadline_passed() and self._step():
                    self._wake.wait(TICK)
                    self._wake.clear()
            self._wind_down()
        except Exception as e:  # never leave a pod silently stuck
            log.exception("pod %s: agent error", self.name)
            self._kill_all(0)
            with self.lock:
                self.outcome = Outcome(
                    "Failed", "NodeAgentError", f"the node agent failed to run the pod: {e}"
                )
        finally:
            shutil.rmtree(self.dir / "volumes", ignore_errors=True)  # secrets do not outlive the pod
            self.finished.set()
            self._notify()

    def _prepare_volumes(self) -> bool:
        while self._stop is None:
            try:
                self.volume_paths = materialize(self.pod, self.dir, self.config.reader)
                with self.lock:
                    self.sandbox_ready = True
                self._notify()
                return True
            except (VolumeError, ContainerConfigError) as e:
                self._set_waiting_all("ContainerCreating", f"MountVolume.SetUp failed: {e}")
            self._wake.wait(5)
            self._wake.clear()
        return False

    def _set_waiting_all(self, reason: str, message: str) -> None:
        with self.lock:
            changed = any(
                (x.rec.waiting_reason, x.rec.waiting_message) != (reason, message) for x in self.slots
            )
            for x in self.slots:
                x.rec.waiting_reason, x.rec.waiting_message = reason, message
        if changed:
            self._notify()

    def _deadline_passed(self) -> bool:
        deadline = self.pod["spec"].get("activeDeadlineSeconds")
        if deadline is None or time.monotonic() - self._started_mono < deadline:
            return False
        grace = float(self.pod["spec"].get("terminationGracePeriodSeconds", 30))
        self.request_stop(
            grace,
            Outcome(
                "Failed", "DeadlineExceeded", "Pod was active on the node longer than the specified deadline"
            ),
        )
        return True

    def _step(self) -> bool:
        """One pass over the containers. False once the pod has nothing left to run."""
        policy = self.pod["spec"].get("restartPolicy", "Always")
        for s in (s for s in self.slots if s.init):
            if s.rec.succeeded:
                continue
            self._drive(s, "Never" if policy == "Never" else "OnFailure")
            if s.rec.succeeded:
                continue
            if s.done:  # failed, and the policy says never again
                return False
            return True
        for s in self.slots:
            if not s.init:
                self._drive(s, policy)
        return not all(s.done for s in self.slots if not s.init)

    def _drive(self, s: Slot, policy: str) -> None:
        if s.proc is not None:
            exit_ = s.proc.poll()
            if exit_ is None:
                limit = s.memory_limit
                if limit is None or s.proc.rss_bytes() <= limit:
                    return
                log.info("pod %s container %s: over its memory limit, killing", self.name, s.rec.name)
                s.oom = True
                s.proc.signal_group(signal.SIGKILL)
                s.proc.proc.wait()
                exit_ = s.proc.poll()
            self._record_exit(s, exit_, policy)
            return
        if s.done or time.monotonic() < s.next_start:
            return
        self._start(s, policy)

    def _start(self, s: Slot, policy: str) -> None:
        pod_name = self.pod["metadata"]["name"]
        try:
            launch = build_launch(
                self.pod,
                s.spec,
                images=self.config.images,
                reader=self.config.reader,
                pod_dir=self.dir,
                volume_host_paths=self.volume_paths,
                pass_env=self.config.pass_env,
                api_server=self.config.api_server,
            )
        except ImageNotInTable as e:
            s.pull_failures += 1
            delay = backoff_seconds(s.pull_failures)
            s.next_start = time.monotonic() + delay
            with self.lock:
                if s.pull_failures == 1:
                    s.rec.waiting_reason, s.rec.waiting_message = "ErrImagePull", str(e)
                else:
                    s.rec.waiting_reason = "ImagePullBackOff"
                    s.rec.waiting_message = f'Back-off pulling image "{s.rec.image}": {e}'
            # kubelet shows ErrImagePull for one sync, then ImagePullBackOff while it waits
            if s.pull_failures == 1:
                s.next_start = time.monotonic() + 2
            self._notify()
            return
        except (ContainerConfigError, ValueError) as e:
            s.next_start = time.monotonic() + 5
            with self.lock:
                s.rec.waiting_reason, s.rec.waiting_message = "CreateContainerConfigError", str(e)
            self._notify()
            return
        s.term_host_path = Path(launch.termination_message_host_path)
        s.term_host_path.write_bytes(b"")  # a fresh, empty file per container instance
        s.oom = False
        started = now_status()
        try:
            proc = ContainerProcess(launch, self.log_path(s.rec.name, s.rec.restart_count))
        except OSError as e:
            with self.lock:
                s.rec.image_id = launch.image_id
                s.rec.started_at = started
            msg = f"failed to start container process: exec {launch.argv[0]!r}: {e.strerror or e}"
            self._record_exit(s, Exit(128, None), policy, reason="StartError", message=msg)
            return
        with self.lock:
            s.proc = proc
            s.rec.image_id = launch.image_id
            s.rec.container_id = f"process://{proc.pid}"
            s.rec.started_at = started
            s.rec.terminated = None
            s.rec.waiting_reason, s.rec.waiting_message = "", ""
        self._save_pids()
        log.info(
            "pod %s/%s container %s started: pid %d argv %s",
            self.pod["metadata"]["namespace"],
            pod_name,
            s.rec.name,
            proc.pid,
            launch.argv,
        )
        self._notify()

    def _record_exit(
        self,
        s: Slot,
        exit_: Exit,
        policy: str,
        *,
        reason: str | None = None,
        message: str | None = None,
        restart: bool = True,
    ) -> None:
        if message is None:
            message = termination_message(
                s.term_host_path,
                s.spec.get("terminationMessagePolicy", "File"),
                exit_.exit_code,
                self.log_path(s.rec.name, s.rec.restart_count),
            )
        state = terminated_state(
            137 if s.oom else exit_.exit_code,
            started_at=s.rec.started_at,
            finished_at=now_status(),
            oom=s.oom,
            signal=exit_.signal,
            message=message,
            container_id=s.rec.container_id,
            reason=reason,
        )
        again = restart and (policy == "Always" or (policy == "OnFailure" and state["exitCode"] != 0))
        with self.lock:
            s.proc = None
            if again:
                s.crashes += 1
                delay = backoff_seconds(s.crashes)
                s.next_start = time.monotonic() + delay
                s.rec.last_terminated = state
                s.rec.terminated = None
                s.rec.started_at = None
                s.rec.restart_count += 1
                s.rec.waiting_reason = "CrashLoopBackOff"
                s.rec.waiting_message = (
                    f"back-off {delay:.0f}s restarting failed container={s.rec.name} "
                    f"pod={self.pod['metadata']['name']}_{self.pod['metadata']['namespace']}"
                    f"({self.uid})"
                )
            else:
                s.rec.terminated = state
                s.done = True
        log.info("pod %s container %s exited: %s", self.name, s.rec.name, state)
        self._save_pids()
        self._notify()

    def _kill_all(self, grace: float) -> None:
        running = [s for s in self.slots if s.proc is not None]
        for s in running:
            s.proc.signal_group(signal.SIGTERM)
        deadline = time.monotonic() + grace
        while any(s.proc.poll() is None for s in running) and time.monotonic() < deadline:
            time.sleep(0.1)
        for s in running:
            if s.proc.poll() is None:
                s.proc.signal_group(signal.SIGKILL)
                s.proc.proc.wait()
            self._record_exit(s, s.proc.poll(), "Never", restart=False)

    def _wind_down(self) -> None:
        """After the loop: stop what still runs and settle the phase."""
        stop = self._stop
        if stop is None:
            return  # every container finished by itself; the computed phase is terminal
        grace, outcome = stop
        self._kill_all(grace)
        with self.lock:
            for s in self.slots:
                if s.rec.terminated is None:  # never started, or waiting to restart
                    s.rec.terminated = terminated_state(
                        137,
                        started_at=None,
                        finished_at=now_status(),
                        reason="ContainerStatusUnknown",
                        message=LOST_MESSAGE,
                    )
                    s.rec.started_at = None
            if outcome is None:
                ok = all(s.rec.succeeded for s in self.slots)
                outcome = Outcome("Succeeded" if ok else "Failed")
            self.outcome = outcome

    def _save_pids(self) -> None:
        pids = {
            s.rec.name: {"pid": s.proc.pid, "create_time": s.proc.create_time}
            for s in self.slots
            if s.proc is not None
        }
        record = {"uid": self.uid, "started": True, "running": pids}
        tmp = self.dir / ".run.json.tmp"
        tmp.write_text(json.dumps(record))
        tmp.replace(self.dir / "run.json")
