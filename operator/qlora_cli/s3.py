"""An S3 client for reading what a job published, configured like boto3 with the job's own defaults.

Credentials follow boto3's chain (flags, then AWS_* environment, profiles, instance roles). The
endpoint is --endpoint-url, else AWS_ENDPOINT_URL(_S3), else the job's spec.output.endpointUrl:
the cluster may reach S3 at an address the laptop cannot, so the override is for that.
"""

import os
from contextlib import contextmanager
from dataclasses import dataclass

import click


@dataclass
class S3Options:
    endpoint_url: str | None = None
    profile: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = None


def s3_options(command):
    command = click.option("--endpoint-url", help="S3 endpoint (default: $AWS_ENDPOINT_URL, then the job's).")(command)
    command = click.option("--profile", help="AWS profile (default: $AWS_PROFILE).")(command)
    command = click.option("--access-key-id", envvar="AWS_ACCESS_KEY_ID", default=None, show_envvar=True)(command)
    command = click.option("--secret-access-key", envvar="AWS_SECRET_ACCESS_KEY", default=None,
                           show_envvar=True)(command)
    return command


@contextmanager
def s3_errors(what: str):
    """botocore's failures (no credentials, refused, unreachable) as one line instead of a traceback."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except ClientError as exc:
        error = exc.response.get("Error", {})
        raise click.ClickException(f"{what}: S3 refused: {error.get('Code')} {error.get('Message', '')}") from exc
    except BotoCoreError as exc:
        raise click.ClickException(f"{what}: {exc} (credentials: --access-key-id/--secret-access-key, "
                                   "AWS_* variables or --profile; endpoint: --endpoint-url)") from exc


def split_uri(uri: str) -> tuple[str, str]:
    """s3://bucket/key/prefix/ -> (bucket, "key/prefix/")."""
    if not uri.startswith("s3://"):
        raise click.ClickException(f"not an s3:// URI: {uri}")
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return bucket, key


def s3_client(output_spec: dict, options: S3Options):
    import boto3
    from botocore.config import Config

    endpoint = (options.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
                or output_spec.get("endpointUrl"))
    session = boto3.Session(profile_name=options.profile, aws_access_key_id=options.access_key_id,
                            aws_secret_access_key=options.secret_access_key)
    style = output_spec.get("addressingStyle", "auto")
    return session.client("s3", endpoint_url=endpoint, region_name=output_spec.get("region", "us-east-1"),
                          config=Config(s3={"addressing_style": style}, retries={"max_attempts": 3}))
