"""S3 and the other places data comes from: s3://, https:// and pvc:// (a mounted claim).

One S3 connection, configured from `spec.output`, publishes the adapter and reads s3:// models and
datasets. Credentials come from the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and
AWS_SESSION_TOKEN, which the pod gets from the Secret) or boto3's other ambient sources.
"""

import copy
import logging
import os
import shutil
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import boto3
from boto3.exceptions import RetriesExceededError, S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from botocore.exceptions import ConnectionError as BotoConnectionError
from qlora_api import ExitCode
from qlora_api.spec import OutputSpec

from qlora_trainer.errors import (
    S3_NOT_FOUND_CODES,
    TrainerFailure,
    client_error_parts,
    s3_failure,
    storage_unavailable,
)

log = logging.getLogger(__name__)
_CONDITION_FAILED = {"PreconditionFailed", "ConditionalRequestConflict"}

PVC_ROOT_ENV = "QLORA_PVC_ROOT"
DEFAULT_PVC_ROOT = "/mnt/pvc"
# The retry policy, in two layers:
# 1. botocore retries each request (standard mode: throttling, 5xx, refused or dropped connections)
#    up to MAX_ATTEMPTS times, waiting a random 0..2^n s (at most 20 s) between tries: a few
#    seconds for an endpoint that refuses connections. The env var is for slow networks.
MAX_ATTEMPTS = int(os.environ.get("QLORA_S3_MAX_ATTEMPTS", "5"))
# 2. The trainer retries every whole operation (a listing, a read, a conditional write, a whole file
#    transfer, which for a multipart upload means all its parts again) while the store is away:
#    waits of 1, 2, 4, ... s, at most OUTAGE_MAX_WAIT_SECONDS each, until OUTAGE_BUDGET_SECONDS have
#    passed since the operation first failed; then the run fails StorageUnavailable (exit 5,
#    retryable: the operator starts the next attempt, which resumes from the newest checkpoint).
#    botocore alone gives up within seconds, and a store restarting or a brief partition takes
#    longer: without this layer such a flap failed the attempt and cost a model reload.
#    The budget applies only once the store has answered in this run: an endpoint that never
#    answered is more likely a wrong URL than an outage, and fails the first check in seconds.
OUTAGE_BUDGET_SECONDS = 300.0  # QLORA_S3_OUTAGE_SECONDS overrides it (the tests use a short one)
OUTAGE_FIRST_WAIT_SECONDS = 1.0
OUTAGE_MAX_WAIT_SECONDS = 30.0
MiB = 1024 * 1024
# Parts of 64 MiB: a 1.5B model's merged export (~3 GB) is ~50 parts, far under S3's 10,000.
TRANSFER = TransferConfig(multipart_threshold=64 * MiB, multipart_chunksize=64 * MiB, max_concurrency=8)


MIN_UPLOAD_PART = 8 * MiB  # boto3's own default part size; S3 refuses parts under 5 MiB but the last


def upload_transfer(transfer: TransferConfig, size: int) -> TransferConfig:
    """`transfer` for uploading a file of `size` bytes, with parts small enough that all of
    `max_concurrency` are in flight: size / max_concurrency, rounded up to a MiB, at least
    MIN_UPLOAD_PART (or the configured part if smaller), at most the configured part. An 84 MB
    adapter in fixed 64 MiB parts went up as one 64 MiB part beside one of 16 MiB, so one request
    carried most of it: the 8B row's publish phase took 1.03 s on the H200 machine, 0.59 s in these
    parts (benchmarks/results/trainer_cli_speed_h200.md, session 11; benchmarks/publish_timing.py
    times the steps). The threshold stays: a file below it is one PUT, as before. A 3 GB merged
    export keeps its 64 MiB parts."""
    if size < transfer.multipart_threshold:
        return transfer
    floor = min(MIN_UPLOAD_PART, transfer.multipart_chunksize)
    part = -(-size // max(1, transfer.max_request_concurrency) // MiB) * MiB
    part = min(transfer.multipart_chunksize, max(floor, part))
    if part == transfer.multipart_chunksize:
        return transfer
    sized = copy.copy(transfer)  # every other setting as configured
    sized.multipart_chunksize = part
    return sized


@dataclass(frozen=True)
class S3Uri:
    bucket: str
    key: str

    @classmethod
    def parse(cls, uri: str) -> "S3Uri":
        if not uri.startswith("s3://"):
            raise ValueError(f"not an s3:// URI: {uri}")
        bucket, _, key = uri[len("s3://"):].partition("/")
        return cls(bucket, key)

    def join(self, *parts: str) -> "S3Uri":
        key = "/".join(p.strip("/") for p in (self.key, *parts) if p.strip("/"))
        return S3Uri(self.bucket, key)

    def as_prefix(self) -> str:
        return self.key.rstrip("/") + "/" if self.key.strip("/") else ""

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


@dataclass(frozen=True)
class S3Object:
    key: str
    size: int
    etag: str


class S3Storage:
    """The one S3 connection of a run; every error becomes a TrainerFailure that names the URI."""

    def __init__(self, output: OutputSpec, transfer: TransferConfig = TRANSFER,
                 outage_budget_seconds: float | None = None):
        addressing = None if output.addressing_style == "auto" else output.addressing_style
        config = Config(
            region_name=output.region,
            retries={"max_attempts": MAX_ATTEMPTS, "mode": "standard"},
            connect_timeout=10,
            read_timeout=120,
            # Room for the publisher's files in flight, each multipart with its own parts in flight
            # (publishing.UPLOAD_WORKERS x TRANSFER.max_concurrency): fewer would drop connections.
            max_pool_connections=32,
            s3={"addressing_style": addressing} if addressing else {},
            # Checksums only where S3 requires them: several S3-compatible servers reject the
            # CRC headers that newer boto3 sends by default.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        self.endpoint = output.endpoint_url or "AWS S3"
        # A session of its own: boto3's default session resolves credentials once per process, so a
        # second store with other credentials (a test, a tool) would silently use the first one's.
        self.client = boto3.session.Session().client("s3", endpoint_url=output.endpoint_url, config=config)
        self.transfer = transfer
        self.outage_budget = (float(os.environ.get("QLORA_S3_OUTAGE_SECONDS", OUTAGE_BUDGET_SECONDS))
                              if outage_budget_seconds is None else outage_budget_seconds)
        self.reached = False  # whether the store has answered in this run (see OUTAGE_BUDGET_SECONDS)

    # -- checks -----------------------------------------------------------------------------------
    def check_bucket(self, bucket: str) -> None:
        """Fail fast (exit 5) before minutes of model loading if the output bucket is unusable."""
        self._call(f"s3://{bucket}", "reach the bucket", lambda: self.client.head_bucket(Bucket=bucket))

    # -- reads ------------------------------------------------------------------------------------
    def list_objects(self, uri: S3Uri) -> list[S3Object]:
        def listing():  # the whole listing again on a retry: a page token does not outlive a restart
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=uri.bucket, Prefix=uri.as_prefix())
            return [S3Object(item["Key"], item["Size"], item.get("ETag", "").strip('"'))
                    for page in pages for item in page.get("Contents", [])]

        return self._call(uri, "list", listing)

    def list_folders(self, uri: S3Uri) -> list[str]:
        """Names of the immediate sub-folders of a prefix."""
        def listing():
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=uri.bucket, Prefix=uri.as_prefix(), Delimiter="/")
            return [p["Prefix"][len(uri.as_prefix()):].strip("/")
                    for page in pages for p in page.get("CommonPrefixes", [])]

        return self._call(uri, "list", listing)

    def get_bytes(self, uri: S3Uri) -> bytes | None:
        """The object's content, or None if there is no such object."""
        value = self._call(uri, "read", lambda: self.client.get_object(Bucket=uri.bucket, Key=uri.key)["Body"].read(),
                           missing_ok=True)
        return None if value is _MISSING else value

    def exists(self, uri: S3Uri) -> bool:
        return self._call(uri, "read", lambda: self.client.head_object(Bucket=uri.bucket, Key=uri.key),
                          missing_ok=True) is not _MISSING

    def download_file(self, uri: S3Uri, dest: Path) -> Path:
        dest.parent.mkdir(parents=True, exist_ok=True)
        self._call(uri, "download", lambda: self.client.download_file(
            uri.bucket, uri.key, str(dest), Config=self.transfer))
        return dest

    def download_folder(self, uri: S3Uri, dest: Path, objects: list[S3Object] | None = None) -> list[Path]:
        objects = self.list_objects(uri) if objects is None else objects
        prefix = uri.as_prefix()
        paths = []
        for obj in objects:
            rel = obj.key[len(prefix):]
            if not rel or rel.endswith("/"):
                continue
            paths.append(self.download_file(S3Uri(uri.bucket, obj.key), dest / rel))
        return paths

    # -- writes -----------------------------------------------------------------------------------
    def upload_file(self, path: Path, uri: S3Uri) -> None:
        """Upload one file; multipart above the threshold (in parts sized by upload_transfer), retried
        as a whole on transient failure."""
        transfer = upload_transfer(self.transfer, path.stat().st_size)
        self._call(uri, "upload", lambda: self.client.upload_file(str(path), uri.bucket, uri.key, Config=transfer))

    def put_bytes(self, data: bytes, uri: S3Uri, content_type: str = "application/json") -> None:
        self._call(uri, "write", lambda: self.client.put_object(
            Bucket=uri.bucket, Key=uri.key, Body=data, ContentType=content_type))

    def put_bytes_if_absent(self, data: bytes, uri: S3Uri, content_type: str = "application/json") -> bool:
        """Create the object only if no object has that key (If-None-Match: *); False if one has.

        S3, MinIO, R2 and Ceph RGW answer 412 Precondition Failed when the key exists, and 409
        when another conditional write of the key is in flight. A store that ignores the header
        overwrites instead: `conditional_writes_honoured` tells the two apart.

        A retry (botocore's or ours) of a write that landed but whose answer was lost to a store
        restart also gets 412: False then means "an object is there", possibly this very write;
        callers that care compare the content (publishing.claim_publication does)."""
        def create() -> bool:
            try:
                self.client.put_object(Bucket=uri.bucket, Key=uri.key, Body=data, ContentType=content_type,
                                       IfNoneMatch="*")
            except ClientError as exc:
                code, status, _ = client_error_parts(exc)
                if code in _CONDITION_FAILED or status in (409, 412):
                    return False
                raise
            return True

        return self._call(uri, "create", create)

    def conditional_writes_honoured(self, uri: S3Uri) -> bool:
        """Whether this store refuses a second If-None-Match write of an existing key (probed on
        `uri`, which must exist already; the probe writes nothing if the store honours it)."""
        existing = self.get_bytes(uri)
        return existing is not None and not self.put_bytes_if_absent(existing, uri)

    def delete_folder(self, uri: S3Uri) -> None:
        keys = [o.key for o in self.list_objects(uri)]
        for i in range(0, len(keys), 1000):
            batch = {"Objects": [{"Key": k} for k in keys[i:i + 1000]], "Quiet": True}
            self._call(uri, "delete", lambda batch=batch: self.client.delete_objects(Bucket=uri.bucket, Delete=batch))

    # -- error handling ---------------------------------------------------------------------------
    def _call(self, uri, action: str, call, missing_ok: bool = False):
        """call() under the retry policy (OUTAGE_BUDGET_SECONDS); its value, or _MISSING for an
        absent object when missing_ok. Permanent failures (denied, no bucket) are never retried."""
        first_failure, wait = None, OUTAGE_FIRST_WAIT_SECONDS
        while True:
            try:
                value = self._translated(uri, action, call, missing_ok)
            except TrainerFailure as failure:
                if failure.exit_code != ExitCode.STORAGE_UNAVAILABLE or not self.reached:
                    raise
                now = time.monotonic()
                first_failure = first_failure or now
                away = now - first_failure
                if away + wait > self.outage_budget:
                    raise storage_unavailable(
                        f"S3 at {self.endpoint} unreachable for {away:.0f} s while trying to {action} {uri} "
                        f"(retried with backoff within an outage budget of {self.outage_budget:.0f} s): "
                        f"{failure.message}") from failure
                log.warning("S3 %s of %s failed (store away for %.0f s of a %.0f s budget), retrying in %.0f s: %s",
                            action, uri, away, self.outage_budget, wait, failure.message)
                time.sleep(wait)
                wait = min(wait * 2, OUTAGE_MAX_WAIT_SECONDS)
                continue
            if first_failure is not None:
                log.warning("S3 %s of %s succeeded after the store was away for %.0f s", action, uri,
                            time.monotonic() - first_failure)
            self.reached = True
            return value

    def _translated(self, uri, action: str, call, missing_ok: bool):
        """call()'s value, its errors as TrainerFailures (errors.py says which are transient)."""
        try:
            return call()
        except ClientError as exc:
            code, status, detail = client_error_parts(exc)
            if missing_ok and code in S3_NOT_FOUND_CODES:
                return _MISSING
            if code == "404" and action == "reach the bucket":  # HEAD has no body, so no NoSuchBucket
                code = "NoSuchBucket"
            raise s3_failure(code, status, self.endpoint, action, uri, detail) from exc
        except S3UploadFailedError as exc:
            # boto3's upload_file wraps the ClientError of any part (without `from`): judge the cause.
            cause = exc.__context__
            if isinstance(cause, ClientError):
                code, status, detail = client_error_parts(cause)
                raise s3_failure(code, status, self.endpoint, action, uri, detail) from exc
            raise storage_unavailable(f"S3 at {self.endpoint} failed to {action} {uri}: {exc}") from exc
        except (BotoConnectionError, BotoCoreError, RetriesExceededError) as exc:
            # RetriesExceededError: s3transfer gave up re-reading a download whose connection dropped.
            raise storage_unavailable(f"S3 at {self.endpoint} unreachable while trying to {action} {uri} "
                                      f"(after {MAX_ATTEMPTS} tries with backoff): {exc}") from exc


_MISSING = object()  # an absent object, told apart from an empty one


def pvc_path(uri: str) -> Path:
    """pvc://claim/path -> $QLORA_PVC_ROOT/claim/path: the Job mounts each claim under that root."""
    rest = uri[len("pvc://"):]
    return Path(os.environ.get(PVC_ROOT_ENV, DEFAULT_PVC_ROOT)) / rest


def fetch_file(uri: str, storage: S3Storage, dest_dir: Path) -> Path:
    """A local path holding the file at an s3://, https:// or pvc:// URI (downloaded if remote)."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    if uri.startswith("pvc://"):
        path = pvc_path(uri)
        if not path.is_file():
            raise FileNotFoundError(f"{uri} ({path}) does not exist on the mounted claim")
        return path
    name = uri.rstrip("/").rsplit("/", 1)[-1].split("?", 1)[0] or "data"
    dest = dest_dir / name
    if uri.startswith("s3://"):
        s3 = S3Uri.parse(uri)
        if not storage.exists(s3):
            raise FileNotFoundError(f"{uri} does not exist")
        return storage.download_file(s3, dest)
    if uri.startswith("https://"):
        try:
            with urllib.request.urlopen(uri, timeout=60) as response, open(dest, "wb") as out:
                shutil.copyfileobj(response, out)
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                raise FileNotFoundError(f"{uri} does not exist (HTTP 404)") from exc
            raise storage_unavailable(f"{uri}: HTTP {exc.code} {exc.reason}") from exc
        except (urllib.error.URLError, TimeoutError) as exc:
            raise storage_unavailable(f"{uri} unreachable: {exc}") from exc
        return dest
    raise ValueError(f"unsupported URI scheme: {uri}")
