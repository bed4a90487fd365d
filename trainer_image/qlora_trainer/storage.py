"""S3 and the other places data comes from: s3://, https:// and pvc:// (a mounted claim).

One S3 connection, configured from `spec.output`, publishes the adapter and reads s3:// models and
datasets. Credentials come from the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and
AWS_SESSION_TOKEN, which the pod gets from the Secret) or boto3's other ambient sources.
"""

import logging
import os
import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import boto3
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
# botocore's own retries (standard mode: throttling, 5xx, connection errors, with backoff). Few
# enough that an unreachable endpoint fails within seconds; the env var is for slow networks.
MAX_ATTEMPTS = int(os.environ.get("QLORA_S3_MAX_ATTEMPTS", "5"))
# Whole-transfer retries on top of botocore's per-request ones: a multipart upload that lost a
# part after botocore gave up is restarted as a whole.
TRANSFER_ATTEMPTS = 3
MiB = 1024 * 1024
# Parts of 64 MiB: a 1.5B model's merged export (~3 GB) is ~50 parts, far under S3's 10,000.
TRANSFER = TransferConfig(multipart_threshold=64 * MiB, multipart_chunksize=64 * MiB, max_concurrency=8)


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

    def __init__(self, output: OutputSpec, transfer: TransferConfig = TRANSFER):
        addressing = None if output.addressing_style == "auto" else output.addressing_style
        config = Config(
            region_name=output.region,
            retries={"max_attempts": MAX_ATTEMPTS, "mode": "standard"},
            connect_timeout=10,
            read_timeout=120,
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

    # -- checks -----------------------------------------------------------------------------------
    def check_bucket(self, bucket: str) -> None:
        """Fail fast (exit 5) before minutes of model loading if the output bucket is unusable."""
        with self._errors(f"s3://{bucket}", "reach the bucket"):
            self.client.head_bucket(Bucket=bucket)

    # -- reads ------------------------------------------------------------------------------------
    def list_objects(self, uri: S3Uri) -> list[S3Object]:
        objects = []
        with self._errors(uri, "list"):
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=uri.bucket, Prefix=uri.as_prefix()):
                for item in page.get("Contents", []):
                    objects.append(S3Object(item["Key"], item["Size"], item.get("ETag", "").strip('"')))
        return objects

    def list_folders(self, uri: S3Uri) -> list[str]:
        """Names of the immediate sub-folders of a prefix."""
        names = []
        with self._errors(uri, "list"):
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=uri.bucket, Prefix=uri.as_prefix(), Delimiter="/"
            )
            for page in pages:
                for p in page.get("CommonPrefixes", []):
                    names.append(p["Prefix"][len(uri.as_prefix()):].strip("/"))
        return names

    def get_bytes(self, uri: S3Uri) -> bytes | None:
        """The object's content, or None if there is no such object."""
        with self._errors(uri, "read", missing_ok=True) as outcome:
            return self.client.get_object(Bucket=uri.bucket, Key=uri.key)["Body"].read()
        return outcome.value

    def exists(self, uri: S3Uri) -> bool:
        with self._errors(uri, "read", missing_ok=True) as outcome:
            self.client.head_object(Bucket=uri.bucket, Key=uri.key)
            return True
        return outcome.value is not None

    def download_file(self, uri: S3Uri, dest: Path) -> Path:
        dest.parent.mkdir(parents=True, exist_ok=True)
        self._retrying(uri, "download", lambda: self.client.download_file(
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
        """Upload one file; multipart above the threshold, retried as a whole on transient failure."""
        self._retrying(uri, "upload", lambda: self.client.upload_file(
            str(path), uri.bucket, uri.key, Config=self.transfer))

    def put_bytes(self, data: bytes, uri: S3Uri, content_type: str = "application/json") -> None:
        self._retrying(uri, "write", lambda: self.client.put_object(
            Bucket=uri.bucket, Key=uri.key, Body=data, ContentType=content_type))

    def put_bytes_if_absent(self, data: bytes, uri: S3Uri, content_type: str = "application/json") -> bool:
        """Create the object only if no object has that key (If-None-Match: *); False if one has.

        S3, MinIO, R2 and Ceph RGW answer 412 Precondition Failed when the key exists, and 409
        when another conditional write of the key is in flight. A store that ignores the header
        overwrites instead: `conditional_writes_honoured` tells the two apart."""
        with self._errors(uri, "create"):
            try:
                self.client.put_object(Bucket=uri.bucket, Key=uri.key, Body=data, ContentType=content_type,
                                       IfNoneMatch="*")
            except ClientError as exc:
                code, status, _ = client_error_parts(exc)
                if code in _CONDITION_FAILED or status in (409, 412):
                    return False
                raise
        return True

    def conditional_writes_honoured(self, uri: S3Uri) -> bool:
        """Whether this store refuses a second If-None-Match write of an existing key (probed on
        `uri`, which must exist already; the probe writes nothing if the store honours it)."""
        existing = self.get_bytes(uri)
        return existing is not None and not self.put_bytes_if_absent(existing, uri)

    def delete_folder(self, uri: S3Uri) -> None:
        keys = [o.key for o in self.list_objects(uri)]
        with self._errors(uri, "delete"):
            for i in range(0, len(keys), 1000):
                self.client.delete_objects(
                    Bucket=uri.bucket, Delete={"Objects": [{"Key": k} for k in keys[i:i + 1000]], "Quiet": True}
                )

    # -- error handling ---------------------------------------------------------------------------
    def _retrying(self, uri, action: str, call) -> None:
        for attempt in range(1, TRANSFER_ATTEMPTS + 1):
            try:
                with self._errors(uri, action):
                    call()
                return
            except TrainerFailure as failure:
                if failure.exit_code != ExitCode.STORAGE_UNAVAILABLE or attempt == TRANSFER_ATTEMPTS:
                    raise
                log.warning("S3 %s of %s failed (attempt %d/%d), retrying: %s",
                            action, uri, attempt, TRANSFER_ATTEMPTS, failure.message)
                time.sleep(2 ** attempt)

    @contextmanager
    def _errors(self, uri, action: str, missing_ok: bool = False) -> Iterator["_Outcome"]:
        outcome = _Outcome()
        try:
            yield outcome
        except ClientError as exc:
            code, status, detail = client_error_parts(exc)
            if missing_ok and code in S3_NOT_FOUND_CODES:
                outcome.value = None
                return
            if code == "404" and action == "reach the bucket":  # HEAD has no body, so no NoSuchBucket
                code = "NoSuchBucket"
            raise s3_failure(code, status, self.endpoint, action, uri, detail) from exc
        except (BotoConnectionError, BotoCoreError) as exc:
            raise storage_unavailable(f"S3 at {self.endpoint} unreachable while trying to {action} {uri} "
                                      f"(after {MAX_ATTEMPTS} tries with backoff): {exc}") from exc


class _Outcome:
    value = None


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
