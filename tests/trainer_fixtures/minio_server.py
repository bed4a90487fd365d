"""A private MinIO server for the tests that need what moto does not do: check credentials, honour
conditional writes (If-None-Match), and go away and come back on the same port (a flapping store).

It is the MinIO binary the local cluster uses (built from its Go module by qlora_localcluster.build),
started on a free port with a data folder of its own, so stopping it never touches the shared
cluster's store.
"""

import os
import subprocess
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from trainer_fixtures.s3_server import S3Server, free_port

ACCESS_KEY = "private-minio"
SECRET_KEY = "private-minio-secret"


class MinioProcess:
    def __init__(self, data_dir: Path, port: int | None = None):
        from qlora_localcluster import build

        self.binary = build.ensure_binaries(["minio"])["minio"]
        self.data_dir, self.port = data_dir, port or free_port()
        self.server = S3Server(f"http://127.0.0.1:{self.port}", ACCESS_KEY, SECRET_KEY)
        self.proc: subprocess.Popen | None = None
        self.log_path = data_dir.parent / f"{data_dir.name}.log"

    def start(self, timeout: float = 30.0) -> S3Server:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "MINIO_ROOT_USER": ACCESS_KEY, "MINIO_ROOT_PASSWORD": SECRET_KEY,
               "MINIO_BROWSER": "off", "MINIO_UPDATE": "off"}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [str(self.binary), "server", str(self.data_dir), f"--address=127.0.0.1:{self.port}",
                 f"--console-address=127.0.0.1:{free_port()}"], stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"minio exited with {self.proc.returncode}: {self.log_path.read_text()[-2000:]}")
            if self.ready():
                return self.server
            time.sleep(0.1)
        raise RuntimeError(f"minio not ready after {timeout} s: {self.log_path.read_text()[-2000:]}")

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.server.endpoint}/minio/health/ready", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        """SIGKILL: the store vanishes mid-request, as a crashed or partitioned server would."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@contextmanager
def running_minio(data_dir: Path):
    minio = MinioProcess(data_dir)
    minio.start()
    try:
        yield minio
    finally:
        minio.stop()
