"""Detached background processes tracked by pid files, so `up` and `down` can run in different shells."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Component:
    """One process of the cluster: its name, command line and where its pid and log go."""

    name: str
    argv: list[str]
    state_dir: Path
    env: dict[str, str] | None = None

    @property
    def log(self) -> Path:
        return self.state_dir / "logs" / f"{self.name}.log"

    @property
    def pidfile(self) -> Path:
        return self.state_dir / "pids" / f"{self.name}.pid"


def running_pid(pidfile: Path) -> int | None:
    """The pid recorded in `pidfile` if that process is still alive (zombies count as dead)."""
    try:
        pid_line, _, program = pidfile.read_text().partition("\n")
        pid = int(pid_line)
    except (FileNotFoundError, ValueError):
        return None
    if not _alive(pid):
        return None
    # After a reboot the pid may belong to something else: check it still runs our program.
    cmdline = _cmdline(pid)
    if cmdline is None:
        return None  # gone since _alive looked
    # Empty for a moment as a process starts its program: read right after start(), 2 starts of
    # Kueue in 30 showed none, and the caller waiting for it took it for a process that had exited.
    return pid if not cmdline or program.strip() in cmdline else None


def _cmdline(pid: int) -> str | None:
    """The process's command line, "" when the kernel shows none (or will not show it to us), None
    when the process is gone."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except FileNotFoundError:
        return None
    except OSError:
        return ""


def start(component: Component) -> int:
    component.log.parent.mkdir(parents=True, exist_ok=True)
    component.pidfile.parent.mkdir(parents=True, exist_ok=True)
    with open(component.log, "ab") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%dT%H:%M:%S')} {' '.join(component.argv)}\n".encode())
        log.flush()
        # A session of its own: the process outlives this shell and gets no terminal signals, and
        # `down` can signal its whole process group.
        proc = subprocess.Popen(
            component.argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, **(component.env or {})},
            cwd=component.state_dir,
        )
    component.pidfile.write_text(f"{proc.pid}\n{component.argv[0]}\n")
    return proc.pid


def stop(component: Component, timeout: float) -> str:
    """SIGTERM the component's process group, SIGKILL it after `timeout` s. Returns what happened."""
    pid = running_pid(component.pidfile)
    if pid is None:
        component.pidfile.unlink(missing_ok=True)
        return "not running"
    started = time.monotonic()
    _signal_group(pid, signal.SIGTERM)
    while time.monotonic() - started < timeout:
        if not _alive(pid):
            component.pidfile.unlink(missing_ok=True)
            return f"stopped in {time.monotonic() - started:.1f} s"
        time.sleep(0.2)
    _signal_group(pid, signal.SIGKILL)
    while _alive(pid):
        time.sleep(0.1)
    component.pidfile.unlink(missing_ok=True)
    return f"killed after {timeout:.0f} s"


def kill_pod_processes(nodes_dir: Path) -> int:
    """SIGKILL every process that a node agent under `nodes_dir` started for a pod (the agent gives
    each one NODEAGENT_POD_DIR), so `down` leaves nothing running even if an agent died first."""
    marker = f"NODEAGENT_POD_DIR={nodes_dir.resolve()}".encode()
    killed = 0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            environ = (proc / "environ").read_bytes()
        except OSError:
            continue
        if any(var.startswith(marker) for var in environ.split(b"\0")):
            try:
                os.kill(int(proc.name), signal.SIGKILL)
                killed += 1
            except ProcessLookupError:
                pass
    return killed


def exited(pid: int) -> bool:
    return not _alive(pid)


def log_tail(component: Component, lines: int = 25) -> str:
    try:
        text = component.log.read_text(errors="replace")
    except FileNotFoundError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass
    except PermissionError:
        os.kill(pid, sig)


def _alive(pid: int) -> bool:
    # When this Python process started the component itself, a dead child stays a zombie until
    # reaped; reap it here so it does not look alive.
    try:
        reaped, _ = os.waitpid(pid, os.WNOHANG)
        if reaped == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return True
