"""`qlora describe NAME`: what the job is, where it stands, and what happened, in plain words."""

import click

from qlora_cli.hints import hint_for
from qlora_cli.listing import age
from qlora_cli.main import kube_options, session

# How each condition reads as a sentence, by (type, status).
PLAIN = {
    ("Accepted", "True"): "the operator accepted the spec",
    ("Accepted", "False"): "the operator refused the spec",
    ("Scheduled", "True"): "the trainer pod is on a GPU node",
    ("Scheduled", "False"): "the trainer pod is waiting for a GPU node",
    ("Running", "True"): "the trainer is running",
    ("Running", "False"): "the trainer is not running",
    ("Suspended", "True"): "the job is suspended",
    ("Suspended", "False"): "the job is not suspended",
    ("Succeeded", "True"): "the adapter is published",
    ("Failed", "True"): "the job failed",
}


def condition_lines(status: dict) -> list[str]:
    lines = []
    for c in status.get("conditions") or []:
        plain = PLAIN.get((c["type"], c["status"]), f"{c['type']} is {c['status']}")
        when = age(c.get("lastTransitionTime"))
        line = f"  {plain} ({c['reason']}, {when} ago)"
        if c.get("message"):
            line += f": {c['message']}"
        lines.append(line)
    return lines or ["  none yet: the operator has not seen the job (is it running and watching this namespace?)"]


def event_lines(events: list[dict]) -> list[str]:
    events = sorted(events, key=lambda e: e.get("lastTimestamp") or e.get("eventTime") or "")
    lines = []
    for e in events:
        when = age(e.get("lastTimestamp") or e.get("eventTime"))
        count = f" (x{e['count']})" if (e.get("count") or 1) > 1 else ""
        warn = "warning: " if e.get("type") == "Warning" else ""
        lines.append(f"  {when} ago  {warn}{e.get('reason')}{count}: {e.get('message', '')}")
    return lines or ["  none"]


def describe_lines(job: dict, events: list[dict]) -> list[str]:
    spec, status = job.get("spec") or {}, job.get("status") or {}
    out, model = spec.get("output") or {}, spec.get("model") or {}
    lora, training = spec.get("lora") or {}, spec.get("training") or {}
    meta = job["metadata"]
    revision = f" at {model['revision']}" if model.get("revision") else ""
    lines = [
        f"Name:        {meta['name']}",
        f"Namespace:   {meta.get('namespace')}",
        f"Created:     {meta.get('creationTimestamp')} ({age(meta.get('creationTimestamp'))} ago)",
        f"Model:       {model.get('uri')}{revision}",
        f"Dataset:     {(spec.get('dataset') or {}).get('uri')}",
        f"Output:      s3://{out.get('bucket')}/{out.get('prefix', 'adapters')}/"
        + (f" at {out['endpointUrl']}" if out.get("endpointUrl") else ""),
        f"LoRA:        rank {lora.get('r', 16)}, alpha {lora.get('alpha', 32)}, "
        f"modules {', '.join(lora.get('targetModules') or ['all-linear'])}",
        f"Training:    {training.get('maxSteps', '-')} steps max, lr {training.get('learningRate', 2e-4)}, "
        f"batch {training.get('batchSize', 4)} x {training.get('gradientAccumulationSteps', 4)}",
        f"Phase:       {status.get('phase') or 'Pending'}"
        + (f", attempt {status['attempts']} of {spec.get('backoffLimit', 2) + 1}" if status.get("attempts") else "")
        + (f" (Job {status['jobName']})" if status.get("jobName") else ""),
    ]
    progress = status.get("progress") or {}
    if progress:
        loss = f", loss {progress['loss']:.4g}" if progress.get("loss") is not None else ""
        lines.append(f"Progress:    {progress.get('summary') or progress.get('step')}{loss}")
    if progress.get("checkpointStep") is not None:  # where an evicted or preempted pod would resume
        resumed = (f"; this pod resumed from step {progress['resumedFromStep']}"
                   if progress.get("resumedFromStep") is not None else "")
        lines.append(f"Checkpoint:  step {progress['checkpointStep']} ({progress.get('checkpointUri') or 'in S3'})"
                     f"{resumed}")
    result = status.get("result") or {}
    if result:
        lines.append(f"Adapter:     {result.get('adapterUri')}")
        if result.get("evalLossAfter") is not None:
            lines.append(f"Eval loss:   {result.get('evalLossBefore', float('nan')):.4g} -> {result['evalLossAfter']:.4g}")
    lines.append("Conditions:")
    lines.extend(condition_lines(status))
    failed = next((c for c in status.get("conditions") or [] if c["type"] == "Failed" and c["status"] == "True"), None)
    if failed and (hint := hint_for(failed.get("reason"), failed.get("message"))):
        lines.append(f"Hint:        {hint.replace('NAME', meta['name'])}")
    lines.append("Events:")
    lines.extend(event_lines(events))
    return lines


@click.command()
@click.argument("name")
@kube_options
def describe(name):
    """NAME's spec in short, its conditions and events in plain words."""
    kube = session()
    job = kube.get_job(name)
    click.echo("\n".join(describe_lines(job, kube.events_of(name))))


COMMANDS = [describe]
