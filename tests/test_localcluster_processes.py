"""The local cluster's pid files (processes.running_pid): a component counts as running while its
recorded process is alive and runs its program, also in the moment after start() when the kernel
shows no command line yet. No cluster needed."""

import shutil

from qlora_localcluster import processes
from qlora_localcluster.processes import Component


def test_a_started_process_is_running_even_while_its_command_line_reads_empty(tmp_path, monkeypatch):
    """Kueue's start waited for its process and, 2 starts in 30, read an empty command line right
    after start(): the process was taken for one that had exited (a CI run failed every Kueue
    test so). Only a command line naming another program means the pid is not ours."""
    component = Component("sleeper", [shutil.which("sleep"), "30"], tmp_path)
    pid = processes.start(component)
    try:
        assert processes.running_pid(component.pidfile) == pid  # the real /proc entry
        monkeypatch.setattr(processes, "_cmdline", lambda p: "")
        assert processes.running_pid(component.pidfile) == pid
        monkeypatch.setattr(processes, "_cmdline", lambda p: "/usr/bin/python3\0-c\0...")  # the pid reused
        assert processes.running_pid(component.pidfile) is None
        monkeypatch.setattr(processes, "_cmdline", lambda p: None)  # gone since it looked alive
        assert processes.running_pid(component.pidfile) is None
    finally:
        monkeypatch.undo()
        assert processes.stop(component, timeout=5).startswith("stopped")
    assert processes.running_pid(component.pidfile) is None and not component.pidfile.exists()
