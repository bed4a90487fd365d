"""The trainer's process entry point (`qlora-trainer`, `python -m qlora_trainer`) ends without the
interpreter's finalization (cli.entrypoint): the exit status must still be main()'s or argparse's,
and what the process wrote must still arrive."""

import subprocess
import sys

from qlora_api import ExitCode


def trainer(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qlora_trainer", *args], capture_output=True, text=True,
                          timeout=120, cwd=cwd)


def test_help_and_usage_errors_keep_argparses_exit_codes(tmp_path):
    shown = trainer("--help", cwd=tmp_path)
    assert shown.returncode == 0 and "qlora-trainer" in shown.stdout
    wrong = trainer("--no-such-flag", cwd=tmp_path)
    assert wrong.returncode == 2 and "unrecognized arguments: --no-such-flag" in wrong.stderr


def test_mains_exit_code_and_termination_message_come_through(tmp_path):
    config = tmp_path / "config.json"
    config.write_text('{"not": "a run config"}')
    # main() itself, in a process of its own (it takes over the process's stdout), ended normally.
    returned = tmp_path / "returned"
    subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; from qlora_trainer.cli import main; "
                    "Path(sys.argv[1]).write_text(str(main(sys.argv[2:])))", str(returned),
                    "--config", str(config), "--termination-log", str(tmp_path / "in-process")],
                   capture_output=True, text=True, timeout=120, check=True, cwd=tmp_path)
    expected = int(returned.read_text())
    assert expected not in (ExitCode.OK, ExitCode.UNEXPECTED)  # a classified failure: a code of its own
    ran = trainer("--config", str(config), "--termination-log", str(tmp_path / "message"), cwd=tmp_path)
    assert ran.returncode == expected, ran.stderr
    assert (tmp_path / "message").read_text() == (tmp_path / "in-process").read_text()
