"""Promise 9, the store flaps: a test-owned MinIO is stopped (SIGKILL) and restarted during the model
download, a checkpoint upload and the publication; the real trainer CLI rides each outage out with
bounded backoff and publishes a complete set. An outage longer than the trainer's budget fails the
attempt as StorageUnavailable (exit 5, retryable) with a message that says so, publishes nothing,
and the next attempt publishes once the store is back (the publication claim survives the restart).

Each outage starts at an exact request: the trainer reaches the store through a relay
(trainer_fixtures/s3_relay.py) that stops the store as the chosen request arrives, before it is
forwarded, so the request under way fails for real and no guess about timing is involved.

The trainer's retry policy (storage.py): botocore retries each request (standard mode); the trainer
retries whole operations with waits of 1, 2, 4, ... s (at most 30 s each) for QLORA_S3_OUTAGE_SECONDS
(300 s by default) from the first failure. Here botocore gets 2 tries per request and the budget is
short, so that the trainer's own layer does the work and the over-budget case takes seconds.
"""

import hashlib
import json
import re
import time

import pytest
from qlora_api import ExitCode, TrainerError, TrainerResultMessage
from trainer_fixtures.fixtures import tiny_model_dir  # noqa: F401
from trainer_fixtures.relayed_minio import relayed_minio
from trainer_fixtures.runs import TrainerProcess, run_config, trainer_env

pytestmark = pytest.mark.slow

OUTAGE_SECONDS = 3.0  # how long each flap keeps the store down (plus MinIO's own start, about a second)
BUDGET_SECONDS = 8  # the trainer's outage budget in the over-budget test
FAST_BOTOCORE = {"QLORA_S3_MAX_ATTEMPTS": "2"}


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_model_dir):  # noqa: F811
    with relayed_minio(tmp_path_factory.mktemp("flaps-minio"), tiny_model_dir) as store:
        yield store


def run_root(run_id: str) -> str:
    return f"adapters/team-a/colours/{run_id}/"


def request_path(key: str) -> str:
    """The path of a path-style request for an object of the adapters bucket."""
    return "/adapters/" + re.escape(key)


def published_set_matches_manifest(store, run_id: str) -> dict:
    manifest_body = store.server.get("adapters", run_root(run_id) + "manifest.json")
    manifest = json.loads(manifest_body)
    for entry in manifest["files"]:
        body = store.server.get("adapters", run_root(run_id) + entry["path"])
        assert (len(body), hashlib.sha256(body).hexdigest()) == (entry["size"], entry["sha256"]), entry["path"]
    assert {"adapter_model.safetensors", "adapter_config.json", "metrics.json"} <= {e["path"] for e in manifest["files"]}
    return {"manifest": manifest, "sha256": hashlib.sha256(manifest_body).hexdigest()}


def retried(proc: TrainerProcess, action: str, uri_part: str) -> list[str]:
    """The trainer's own retry warnings for one operation (storage.py's outage layer)."""
    return [line for line in proc.stderr
            if f"S3 {action} of " in line and uri_part in line and "retrying" in line]


def test_the_trainer_rides_out_store_restarts_during_download_checkpoint_and_publish(store, tmp_path):
    run_id = "run-flaps"
    root = run_root(run_id)
    config = run_config(store.trainer_server, store.model_uri, store.train_uri, run_id,
                        training={"maxSteps": 8, "checkpointSteps": 4, "loggingSteps": 4})
    # (a) as the model's weights are requested; (b) as the second file of checkpoint 4 is sent (the
    # first is already in: a partial checkpoint while the store is away); (c) as the adapter is sent
    # during publishing, the publication claim already taken.
    flaps = {
        "download": store.relay.when("GET", r"^/models/tiny-llama/model\.safetensors",
                                     lambda: store.outage(OUTAGE_SECONDS)),
        "checkpoint": store.relay.when("PUT", request_path(root + "checkpoints/step-4/"),
                                       lambda: store.outage(OUTAGE_SECONDS), nth=2),
        "publish": store.relay.when("PUT", request_path(root + "adapter_model.safetensors"),
                                    lambda: store.outage(OUTAGE_SECONDS)),
        # The conditional writes of the publication land, and their answers are lost: the retry
        # meets 412 (the key exists) and must recognise the claim and the manifest as its own.
        "claim answer lost": store.relay.when("PUT", request_path(root + "publish-claim.json"), lose_answer=True),
        "manifest answer lost": store.relay.when("PUT", request_path(root + "manifest.json"), lose_answer=True),
    }
    proc = TrainerProcess(tmp_path / "pod", config, trainer_env(store.trainer_server, **FAST_BOTOCORE))
    rc = proc.wait(timeout=400)
    assert rc == 0, proc.log_tail()
    assert all(event.is_set() for event in flaps.values()), {k: e.is_set() for k, e in flaps.items()}
    assert len(store.outages) == 3 and all(back is not None for _, back in store.outages)

    # Each outage was met by the trainer's retries, not by luck: its log shows the failed operation.
    assert retried(proc, "download", "s3://models/tiny-llama/model.safetensors"), proc.log_tail()
    assert retried(proc, "upload", f"s3://adapters/{root}checkpoints/step-4/"), proc.log_tail()
    assert retried(proc, "upload", f"s3://adapters/{root}adapter_model.safetensors"), proc.log_tail()

    result = proc.termination
    assert isinstance(result, TrainerResultMessage)
    published = published_set_matches_manifest(store, run_id)
    assert result.result.manifest_sha256 == published["sha256"]
    assert result.result.resumed_from_step is None  # one pod did it all: no attempt was spent
    # It knew its own claim and manifest: it neither waited for "another trainer" nor thought it lost.
    assert not [line for line in proc.stderr if "lost the race" in line], proc.log_tail()
    claim = json.loads(store.server.get("adapters", root + "publish-claim.json"))
    assert claim["attempt"] == 1
    # The checkpoint cut by the outage was completed: every file, then its manifest.
    checkpoint = json.loads(store.server.get("adapters", root + "checkpoints/step-4/manifest.json"))
    assert checkpoint["step"] == 4 and {"adapter_model.safetensors", "optimizer.pt"} <= {
        e["path"] for e in checkpoint["files"]}


def test_an_outage_longer_than_the_budget_fails_storage_unavailable_and_publishes_nothing(store, tmp_path):
    run_id = "run-outage"
    root = run_root(run_id)
    config = run_config(store.trainer_server, store.model_uri, store.train_uri, run_id,
                        training={"maxSteps": 4, "checkpointSteps": 4, "loggingSteps": 4})
    env = trainer_env(store.trainer_server, QLORA_S3_OUTAGE_SECONDS=str(BUDGET_SECONDS), **FAST_BOTOCORE)
    stopped_at = {}

    def stop_for_good():
        stopped_at["t"] = time.monotonic()
        store.minio.stop()

    # The store goes away mid-publication (claim taken, adapter being sent) and stays away.
    store.relay.when("PUT", request_path(root + "adapter_model.safetensors"), stop_for_good)
    first = TrainerProcess(tmp_path / "attempt-1", config, env)
    rc = first.wait(timeout=300)
    gave_up_after = time.monotonic() - stopped_at["t"]
    assert rc == ExitCode.STORAGE_UNAVAILABLE, first.log_tail()
    error = first.termination
    assert isinstance(error, TrainerError) and error.reason == "StorageUnavailable"
    assert ExitCode(error.exit_code).retryable
    # It names the upload it gave up on: one of the publication's files (they go up several at a
    # time, so whichever of those in flight failed first in path order, not always the adapter).
    assert re.search(rf"while trying to upload s3://adapters/{re.escape(root)}[^ /]+ ", error.message), error.message
    assert "unreachable for" in error.message and f"outage budget of {BUDGET_SECONDS} s" in error.message
    # Bounded: the budget, plus one last try (two botocore attempts against a relay that closes at once).
    assert BUDGET_SECONDS / 2 <= gave_up_after < BUDGET_SECONDS + 20, gave_up_after

    # Once the store is back: the claim of attempt 1 is there, no manifest, nothing reported published.
    store.minio.start()
    keys = store.server.keys("adapters", root)
    assert root + "publish-claim.json" in keys
    assert root + "manifest.json" not in keys

    # The operator's next attempt resumes from the checkpoint, takes the claim over, publishes it all.
    second = TrainerProcess(tmp_path / "attempt-2", {**config, "attempt": 2}, trainer_env(store.trainer_server))
    assert second.wait(timeout=300) == 0, second.log_tail()
    result = second.termination
    assert isinstance(result, TrainerResultMessage) and result.result.resumed_from_step == 4
    published = published_set_matches_manifest(store, run_id)
    assert result.result.manifest_sha256 == published["sha256"]
    assert any("takes over" in line for line in second.stderr), second.log_tail()
