"""A test-owned MinIO behind an S3Relay, with the tiny model and the colour data in it: what the
fault tests (promises 5 and 9) point the trainer at. The test reads and checks the store directly
(`server`); the trainer goes through the relay (`trainer_server`), so the test can act at an exact
request and stop and restart the store for real."""

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from trainer_fixtures.minio_server import MinioProcess
from trainer_fixtures.runs import jsonl
from trainer_fixtures.s3_relay import S3Relay
from trainer_fixtures.s3_server import S3Server
from trainer_fixtures.tiny_model import chat_records


@dataclass
class RelayedMinio:
    minio: MinioProcess
    relay: S3Relay
    model_uri: str
    train_uri: str
    eval_uri: str

    @property
    def server(self) -> S3Server:
        """The store itself, for the test's own reads."""
        return self.minio.server

    @property
    def trainer_server(self) -> S3Server:
        """The store as the trainer sees it: through the relay, with the same credentials."""
        return S3Server(self.relay.endpoint, self.server.access_key, self.server.secret_key)

    def outage(self, seconds: float) -> threading.Thread:
        """Stop the store now (SIGKILL) and start it again, same port and data, `seconds` later."""
        self.minio.stop()
        outage = [time.monotonic(), None]  # [stopped at, back at] (time.monotonic())
        self.outages.append(outage)

        def restart():
            time.sleep(seconds)
            self.minio.start()
            outage[1] = time.monotonic()

        thread = threading.Thread(target=restart, daemon=True)
        thread.start()
        return thread

    def __post_init__(self):
        self.outages: list[list] = []


@contextmanager
def relayed_minio(folder: Path, tiny_model_dir: Path):
    minio = MinioProcess(folder / "data")
    server = minio.start()
    relay = S3Relay(minio.port)
    try:
        for bucket in ("models", "datasets", "adapters"):
            server.make_bucket(bucket)
        yield RelayedMinio(
            minio, relay,
            model_uri=server.upload_folder(tiny_model_dir, "models", "tiny-llama"),
            train_uri=server.put("datasets", "colours/train.jsonl", jsonl(chat_records(240, seed=1))),
            eval_uri=server.put("datasets", "colours/eval.jsonl", jsonl(chat_records(40, seed=2))),
        )
    finally:
        relay.close()
        minio.stop()
