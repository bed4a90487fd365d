"""One container as one host process group: start it, measure it, signal it, collect its exit."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from .launch import ContainerLaunch
from .logs import LogWriter


@dataclass
class Exit:
    exit_code: int  # as a runtime reports it: 128+N after signal N
    signal: int | None


class ContainerProcess:
    """A started container. Its own session, so the whole group can be signalled at once."""

    def __init__(self, launch: ContainerLaunch, log_path: Path):
        self.launch = launch
        self.log = LogWriter(log_path)
        self.proc = subprocess.Popen(
            launch.argv,
            env=launch.env,
            cwd=launch.cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            close_fds=True,
        )
        self.pid = self.proc.pid
        try:
            self.create_time = psutil.Process(self.pid).create_time()
        except psutil.Error:
            self.create_time = 0.0
        self.log.attach("stdout", self.proc.stdout)
        self.log.attach("stderr", self.proc.stderr)
        self._exit: Exit | None = None

    def poll(self) -> Exit | None:
        if self._exit is None:
            code = self.proc.poll()
            if code is None:
                return None
            self._kill_stragglers()  # the main process is gone: take any orphans in its group along
            self.log.close()
            self._exit = Exit(128 - code, -code) if code < 0 else Exit(code, None)
        return self._exit

    def tree(self) -> list[psutil.Process]:
        try:
            root = psutil.Process(self.pid)
            return [root, *root.children(recursive=True)]
        except psutil.Error:
            return []

    def rss_bytes(self) -> int:
        total = 0
        for p in self.tree():
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        return total

    def signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        if sig == signal.SIGKILL:
            for p in self.tree():  # descendants that left the group with setsid
                try:
                    p.kill()
                except psutil.Error:
                    pass

    def _kill_stragglers(self) -> None:
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def stop(self, grace: float) -> Exit:
        """SIGTERM the group, SIGKILL it after `grace` seconds, wait for the exit."""
        if self.poll() is None:
            self.signal_group(signal.SIGTERM)
            deadline = time.monotonic() + max(grace, 0)
            while self.poll() is None and time.monotonic() < deadline:
                time.sleep(0.1)
            if self.poll() is None:
                self.signal_group(signal.SIGKILL)
                self.proc.wait()
        return self.poll()


def kill_recorded(pid: int, create_time: float) -> bool:
    """Kills a group left behind by an earlier agent, if `pid` is still that process. True if killed."""
    try:
        p = psutil.Process(pid)
        if create_time and abs(p.create_time() - create_time) > 1:
            return False
        procs = [p, *p.children(recursive=True)]
    except psutil.Error:
        return False
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    for q in procs:
        try:
            q.kill()
        except psutil.Error:
            pass
    return True
