"""`qlora serve NAME --for vllm|kserve`: a ready manifest for the published adapter, on stdout."""

import click

from qlora_cli.fetch import published_result
from qlora_cli.main import kube_options, session
from qlora_cli.serving import FETCH_IMAGE, VLLM_IMAGE, kserve_manifests, to_yaml, vllm_manifests


@click.command()
@click.argument("name")
@click.option("--for", "target", type=click.Choice(["vllm", "kserve"]), required=True, help="The serving system.")
@click.option("--image", default=VLLM_IMAGE, show_default=True, help="vLLM server image.")
@click.option("--fetch-image", default=FETCH_IMAGE, show_default=True,
              help="Image with python and boto3 for the init container that fetches and verifies the adapter.")
@click.option("--gpus", type=int, default=1, show_default=True)
@click.option("--service-account", help="KServe: the ServiceAccount whose Secret holds the S3 credentials.")
@kube_options
def serve(name, target, image, fetch_image, gpus, service_account):
    """Print a vLLM Deployment + Service, or a KServe InferenceService, serving NAME's adapter."""
    job = session().get_job(name)
    published_result(job)
    if target == "vllm":
        objects = vllm_manifests(job, image, fetch_image, gpus)
    else:
        try:
            objects = kserve_manifests(job, service_account, gpus)
        except ValueError as exc:
            raise click.ClickException(str(exc)) from exc
    click.echo(to_yaml(objects), nl=False)


COMMANDS = [serve]
