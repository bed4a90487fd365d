"""`qlora submit`: a QLoRAJob from flags or a file; `--dry-run` prints it instead."""

import sys

import click
import yaml

from qlora_cli.main import kube_options, session
from qlora_cli.manifest import build_manifest, load_manifest_file


@click.command()
@click.argument("name", required=False)
@click.option("-f", "--filename", type=click.File("r"), help="A QLoRAJob YAML file ('-' for stdin); flags override it.")
@click.option("--model", help="Base model: hf://org/name, s3://bucket/folder/ or pvc://claim/path.")
@click.option("--revision", help="Branch, tag or commit of an hf:// model.")
@click.option("--dataset", help="Training data: s3://, https:// or pvc:// JSONL/Parquet file.")
@click.option("--eval-dataset", help="A separate eval split (default: 10% of the training data).")
@click.option("--record-format", type=click.Choice(["auto", "messages", "promptCompletion", "text"]))
@click.option("--bucket", help="S3 bucket the adapter is published to.")
@click.option("--prefix", help="Key prefix inside the bucket (default: adapters).")
@click.option("--endpoint-url", help="S3-compatible endpoint (MinIO, Ceph, R2).")
@click.option("--region")
@click.option("--addressing-style", type=click.Choice(["auto", "path", "virtual"]))
@click.option("--secret", help="Secret in the namespace with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY.")
@click.option("--merged-export/--no-merged-export", default=None, help="Also publish a merged bf16 model.")
@click.option("--rank", "-r", type=int, help="LoRA rank (default 16).")
@click.option("--alpha", type=int, help="LoRA alpha (default 32, usually 2*rank).")
@click.option("--dropout", type=float)
@click.option("--target-module", "target_modules", multiple=True, help="Module to adapt (repeat; default all-linear).")
@click.option("--epochs", type=float)
@click.option("--max-steps", type=int)
@click.option("--learning-rate", "--lr", "learning_rate", type=float)
@click.option("--batch-size", type=int, help="Sequences per micro-batch.")
@click.option("--grad-accum", type=int, help="Micro-batches per optimizer step.")
@click.option("--max-seq-length", type=int)
@click.option("--packing/--no-packing", default=None)
@click.option("--logging-steps", type=int)
@click.option("--checkpoint-steps", type=int)
@click.option("--compute-dtype", type=click.Choice(["auto", "bfloat16", "float16", "float32"]))
@click.option("--gpus", type=int, help="GPUs for the trainer pod (default 1).")
@click.option("--gpu-product", help="Required nvidia.com/gpu.product, e.g. NVIDIA-H100-80GB-HBM3.")
@click.option("--memory", help="Host memory request and limit, e.g. 64Gi.")
@click.option("--cpu")
@click.option("--image", help="Trainer image override.")
@click.option("--deadline", type=int, help="activeDeadlineSeconds for all attempts together.")
@click.option("--backoff-limit", type=int)
@click.option("--set", "sets", multiple=True, metavar="PATH=VALUE",
              help="Any other spec field, e.g. --set training.warmupSteps=10 (value read as YAML).")
@click.option("--dry-run", type=click.Choice(["client", "server"]), is_flag=False, flag_value="client", default=None,
              help="Print the QLoRAJob instead of creating it; =server has the API server validate and default it.")
@click.option("--watch", "-w", "then_watch", is_flag=True, help="Watch the job after creating it.")
@kube_options
def submit(name, filename, sets, dry_run, then_watch, **flags):
    """Create a QLoRAJob NAME from flags or -f FILE."""
    base = load_manifest_file(filename.read()) if filename else None
    options = click.get_current_context().obj
    # kubectl's order: -n, then the file's own namespace, then the kubeconfig context's.
    namespace = options.namespace or ((base or {}).get("metadata") or {}).get("namespace")
    if not namespace:
        namespace = _kubeconfig_namespace(options) if dry_run == "client" else session().namespace
    try:
        manifest = build_manifest(name, namespace, flags, list(sets), base)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    if not manifest["metadata"].get("name"):
        raise click.UsageError("give the job a NAME (or metadata.name in -f FILE)")
    if dry_run == "client":
        click.echo(yaml.safe_dump(manifest, sort_keys=False), nl=False)
        return
    kube = session()
    created = kube.create_job(manifest, server_dry_run=dry_run == "server")
    if dry_run == "server":
        created.get("metadata", {}).pop("managedFields", None)
        click.echo(yaml.safe_dump(created, sort_keys=False), nl=False)
        return
    job = created["metadata"]["name"]
    click.echo(f"qlorajob/{job} created in namespace {namespace}")
    if then_watch:
        from qlora_cli.watch import watch_job

        kube.namespace = namespace
        sys.exit(watch_job(kube, job))
    click.echo(f"follow it with: qlora watch {job} -n {namespace}")


def _kubeconfig_namespace(options) -> str:
    """The context's namespace for a client dry run, which must work without a reachable server."""
    try:
        from kubernetes import config

        _, active = config.list_kube_config_contexts(config_file=options.kubeconfig)
        return (active or {}).get("context", {}).get("namespace") or "default"
    except Exception:  # no kubeconfig at all is fine for printing a manifest
        return "default"


COMMANDS = [submit]
