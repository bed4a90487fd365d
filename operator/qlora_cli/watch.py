"""`qlora watch NAME`: a live progress bar from the status until the job ends.

Exit status: 0 when the adapter is published, 1 when the job failed (reason and hint printed),
124 when --timeout passed first: scripts can chain `qlora watch job && qlora fetch job dir`.
"""

import sys
import time
from datetime import UTC, datetime

import click

from qlora_cli.main import kube_options, session
from qlora_cli.progress import TERMINAL, RateTracker, closing_report, current_condition, progress_line

EXIT_FAILED, EXIT_TIMEOUT = 1, 124


class LineDisplay:
    """On a terminal one line redrawn in place; elsewhere (a log, a pipe) one line per change."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stdout
        self.live = self.stream.isatty()
        self.drawn = ""

    def show(self, line: str) -> None:
        if line == self.drawn:
            return
        if self.live:
            self.stream.write("\r\x1b[2K" + line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
        self.drawn = line

    def note(self, text: str) -> None:
        """A line that stays (a condition change), printed above the live line."""
        if self.live and self.drawn:
            self.stream.write("\r\x1b[2K")
        self.stream.write(text + "\n")
        if self.live and self.drawn:
            self.stream.write(self.drawn)
        self.stream.flush()

    def close(self) -> None:
        if self.live and self.drawn:
            self.stream.write("\n")
            self.stream.flush()


def watch_job(kube, name: str, interval: float = 1.0, timeout: float | None = None) -> int:
    display, rates = LineDisplay(), RateTracker()
    deadline = time.monotonic() + timeout if timeout else None
    said = None
    while True:
        job = kube.get_job(name)
        status = job.get("status") or {}
        now = datetime.now(UTC)
        rates.add(time.monotonic(), (status.get("progress") or {}).get("step", 0))
        state = current_condition(status)
        if state != said:
            message = status.get("message") or ""
            display.note(f"{now:%H:%M:%S} {state}" + (f": {message}" if message else ""))
            said = state
        display.show(progress_line(status, now, rates))
        if status.get("phase") in TERMINAL:
            display.close()
            succeeded, lines = closing_report(job)
            click.echo("\n".join(lines))
            return 0 if succeeded else EXIT_FAILED
        if deadline and time.monotonic() > deadline:
            display.close()
            click.echo(f"still {status.get('phase') or 'Pending'} after {timeout:g} s", err=True)
            return EXIT_TIMEOUT
        time.sleep(interval)


@click.command()
@click.argument("name")
@click.option("--interval", type=float, default=1.0, show_default=True, help="Seconds between status reads.")
@click.option("--timeout", type=float, default=None, help="Give up (exit 124) after this many seconds.")
@kube_options
def watch(name, interval, timeout):
    """Show NAME's progress live until it succeeds (exit 0) or fails (exit 1)."""
    sys.exit(watch_job(session(), name, interval, timeout))


COMMANDS = [watch]
