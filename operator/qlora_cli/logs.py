"""`qlora logs NAME`: the current attempt's trainer log (or an earlier attempt's)."""

import sys

import click

from qlora_cli.main import kube_options, session


@click.command()
@click.argument("name")
@click.option("--attempt", type=int, help="An earlier attempt (default: the current one).")
@click.option("-f", "--follow", is_flag=True, help="Keep printing as the trainer writes.")
@click.option("--tail", type=int, help="Only the last N lines.")
@kube_options
def logs(name, attempt, follow, tail):
    """The trainer's log for NAME's current attempt."""
    kube = session()
    status = kube.get_job(name).get("status") or {}
    job_name = status.get("jobName")
    if attempt is not None:
        job_name = f"{job_name.rsplit('-', 1)[0]}-{attempt}" if job_name else None
    if not job_name:
        raise click.ClickException(f"{name} has no trainer attempt yet ({status.get('phase') or 'Pending'})")
    pods = kube.pods_of_job(job_name)
    if not pods:
        raise click.ClickException(f"Job {job_name} has no pods (not started yet, or deleted after its TTL)")
    pod = pods[0]["metadata"]["name"]
    if len(pods) > 1:
        click.echo(f"# pod {pod} (the newest of {len(pods)} for Job {job_name})", err=True)
    if not follow:
        click.echo(kube.pod_log(pod, tail=tail), nl=False)
        return
    response = kube.pod_log(pod, follow=True, tail=tail)
    try:
        for chunk in response.stream(1024):
            sys.stdout.write(chunk.decode(errors="replace"))
            sys.stdout.flush()
    finally:
        response.release_conn()


COMMANDS = [logs]
