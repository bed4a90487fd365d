"""`qlora fetch NAME DIR`: the published adapter, every file checked against the manifest.

The trainer uploads every file, then `manifest.json` (size and sha256 of each) last, and reports
the manifest's own sha256 in the status. So: the manifest must match the status's digest, every
file must match the manifest, and nothing lands in DIR until all of them do. A missing manifest
(a publish cut short), a missing file, or a changed byte refuses the whole set.
"""

import hashlib
import json
import os
import shutil
from pathlib import Path, PurePosixPath

import click

from qlora_cli.main import kube_options, session
from qlora_cli.s3 import S3Options, s3_client, s3_errors, s3_options, split_uri

MANIFEST = "manifest.json"
MERGED = "merged/"


class FetchRefused(click.ClickException):
    exit_code = 1


def safe_relative(path: str) -> PurePosixPath:
    rel = PurePosixPath(path)
    if rel.is_absolute() or ".." in rel.parts or not rel.parts:
        raise FetchRefused(f"the manifest lists {path!r}, which is outside the adapter folder")
    return rel


def read_manifest(s3, result: dict) -> tuple[bytes, dict]:
    bucket, prefix = split_uri(result["adapterUri"])
    manifest_bucket, manifest_key = split_uri(result.get("manifestUri") or f"s3://{bucket}/{prefix}{MANIFEST}")
    try:
        body = s3.get_object(Bucket=manifest_bucket, Key=manifest_key)["Body"].read()
    except s3.exceptions.NoSuchKey as exc:
        raise FetchRefused(f"s3://{manifest_bucket}/{manifest_key} does not exist: the adapter is not "
                           "(completely) published, refusing a partial set") from exc
    digest = hashlib.sha256(body).hexdigest()
    expected = result.get("manifestSha256")
    if expected and digest != expected:
        raise FetchRefused(f"{MANIFEST} has sha256 {digest}, the job's status says {expected}: it was changed "
                           "after the trainer published it")
    return body, json.loads(body)


def download_verified(s3, bucket: str, key: str, entry: dict, dest: Path) -> None:
    digest, size = hashlib.sha256(), 0
    try:
        stream = s3.get_object(Bucket=bucket, Key=key)["Body"]
    except s3.exceptions.NoSuchKey as exc:
        raise FetchRefused(f"{entry['path']} is in the manifest but not in S3: a partial set") from exc
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest, "wb") as out:
        for chunk in stream.iter_chunks(1 << 20):
            digest.update(chunk)
            size += len(chunk)
            out.write(chunk)
    if size != entry["size"] or digest.hexdigest() != entry["sha256"]:
        raise FetchRefused(f"{entry['path']}: {size} bytes with sha256 {digest.hexdigest()}, the manifest says "
                           f"{entry['size']} bytes with sha256 {entry['sha256']}: refusing a tampered set")


def fetch_adapter(s3, result: dict, dest: Path, include_merged: bool = False) -> list[dict]:
    """Download and verify into a staging folder inside DEST, then move the files into place."""
    body, manifest = read_manifest(s3, result)
    entries = manifest.get("files") or []
    reported = {f["path"]: f for f in result.get("files") or []}
    if reported and reported != {e["path"]: e for e in entries}:
        raise FetchRefused("the manifest's file list differs from the one in the job's status")
    wanted = [e for e in entries if include_merged or not e["path"].startswith(MERGED)]
    if not any(e["path"] == "adapter_config.json" for e in wanted):
        raise FetchRefused("the manifest lists no adapter_config.json: not an adapter")
    bucket, prefix = split_uri(result["adapterUri"])
    dest.mkdir(parents=True, exist_ok=True)
    staging = dest / f".qlora-fetch-{os.getpid()}"
    try:
        for entry in wanted:
            rel = safe_relative(entry["path"])
            download_verified(s3, bucket, prefix + entry["path"], entry, staging / rel)
        for entry in wanted:
            target = dest / safe_relative(entry["path"])
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / entry["path"], target)
        (dest / MANIFEST).write_bytes(body)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return wanted


def published_result(job: dict) -> dict:
    status = job.get("status") or {}
    result = status.get("result") or {}
    if status.get("phase") != "Succeeded" or not result.get("adapterUri"):
        raise click.ClickException(f"{job['metadata']['name']} has published no adapter "
                                   f"(phase {status.get('phase') or 'Pending'})")
    return result


@click.command()
@click.argument("name")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--merged", is_flag=True, help="Also download the merged bf16 model (spec.output.mergedExport).")
@s3_options
@kube_options
def fetch(name, directory, merged, endpoint_url, profile, access_key_id, secret_access_key):
    """Download NAME's adapter into DIRECTORY, verified against its manifest."""
    job = session().get_job(name)
    result = published_result(job)
    s3 = s3_client(job["spec"]["output"], S3Options(endpoint_url, profile, access_key_id, secret_access_key))
    with s3_errors(f"fetching {result['adapterUri']}"):
        files = fetch_adapter(s3, result, directory, merged)
    total = sum(f["size"] for f in files)
    click.echo(f"{len(files)} files ({total / 1e6:.1f} MB) from {result['adapterUri']} verified against "
               f"{MANIFEST} (sha256 {result.get('manifestSha256', '?')[:12]}) into {directory}")


COMMANDS = [fetch]
