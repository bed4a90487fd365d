"""`qlora list`: the namespace's QLoRAJobs, one line each."""

from datetime import UTC, datetime

import click

from qlora_cli.main import kube_options, session
from qlora_cli.progress import current_condition, parse_time


def age(timestamp: str | None, now: datetime | None = None) -> str:
    created = parse_time(timestamp)
    if created is None:
        return "?"
    seconds = int(((now or datetime.now(UTC)) - created).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{max(seconds, 0)}s"


def job_row(job: dict, now: datetime | None = None) -> list[str]:
    status = job.get("status") or {}
    progress, result = status.get("progress") or {}, status.get("result") or {}
    loss = progress.get("loss")
    evals = (result.get("evalLossBefore"), result.get("evalLossAfter"))
    return [
        job["metadata"]["name"],
        status.get("phase") or "Pending",
        progress.get("summary") or "-",
        f"{loss:.4g}" if loss is not None else "-",
        f"{evals[0]:.4g} -> {evals[1]:.4g}" if None not in evals else "-",
        current_condition(status),
        age(job["metadata"].get("creationTimestamp"), now),
    ]


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("   ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *rows])


@click.command("list")
@kube_options
def list_jobs():
    """The QLoRAJobs in the namespace."""
    kube = session()
    jobs = sorted(kube.list_jobs(), key=lambda j: j["metadata"].get("creationTimestamp", ""))
    if not jobs:
        click.echo(f"no QLoRAJobs in namespace {kube.namespace}")
        return
    click.echo(table(["NAME", "PHASE", "PROGRESS", "LOSS", "EVAL LOSS", "CONDITION", "AGE"],
                     [job_row(j) for j in jobs]))


COMMANDS = [list_jobs]
