"""A real S3 server over HTTP for the trainer tests.

QLORA_TEST_S3_ENDPOINT (with AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY) points the tests at an S3
server that is already running, e.g. the local cluster's MinIO; otherwise moto's S3 server runs
in-process on 127.0.0.1 (a real HTTP server on a free port, not patched HTTP).
"""

import os
import socket
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


@dataclass
class S3Server:
    endpoint: str
    access_key: str
    secret_key: str

    @property
    def env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_DEFAULT_REGION": "us-east-1"}

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.access_key,
                            aws_secret_access_key=self.secret_key, region_name="us-east-1",
                            config=Config(s3={"addressing_style": "path"}))

    def make_bucket(self, name: str) -> None:
        client = self.client()
        try:
            client.create_bucket(Bucket=name)
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass

    def upload_folder(self, folder: Path, bucket: str, prefix: str) -> str:
        client = self.client()
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                client.upload_file(str(path), bucket, f"{prefix.strip('/')}/{path.relative_to(folder)}")
        return f"s3://{bucket}/{prefix.strip('/')}/"

    def put(self, bucket: str, key: str, body: bytes) -> str:
        self.client().put_object(Bucket=bucket, Key=key, Body=body)
        return f"s3://{bucket}/{key}"

    def get(self, bucket: str, key: str) -> bytes:
        return self.client().get_object(Bucket=bucket, Key=key)["Body"].read()

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_s3():
    if os.environ.get("QLORA_TEST_S3_ENDPOINT"):
        yield S3Server(os.environ["QLORA_TEST_S3_ENDPOINT"], os.environ["AWS_ACCESS_KEY_ID"],
                       os.environ["AWS_SECRET_ACCESS_KEY"])
        return
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield S3Server(f"http://127.0.0.1:{port}", "testing", "testing")
    finally:
        server.stop()
