"""Promises 6 and 7 against a real MinIO (which honours If-None-Match; moto's answer is checked too):
two trainers racing to publish one run leave one manifest that matches the objects, and the loser
learns it lost; a publication cut between the files and the manifest is never a publication, and
the next attempt publishes the complete set.

The operator's half of promise 7 (a result without the manifest digest is not Succeeded) is in
test_the_operator_needs_the_manifest_digest_to_say_succeeded below, with no server.
"""

import hashlib
import json
import threading

import pytest
from qlora_api import ConditionType, ExitCode, Reason, TrainingResult
from qlora_api.spec import OutputSpec
from qlora_operator.conditions import find
from qlora_operator.derivation import derive_status
from qlora_operator.settings import OperatorSettings
from qlora_trainer import publishing
from qlora_trainer.publishing import RunLocation
from qlora_trainer.storage import S3Storage
from support.objects import observe, pod, qlorajob, result_message, terminated, trainer_job
from trainer_fixtures.minio_server import running_minio
from trainer_fixtures.s3_server import running_s3

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json")


@pytest.fixture(scope="module")
def minio(tmp_path_factory):
    with running_minio(tmp_path_factory.mktemp("minio") / "data") as server:
        server.server.make_bucket("adapters")
        yield server


def storage_for(server, monkeypatch) -> S3Storage:
    for key, value in server.env.items():
        monkeypatch.setenv(key, value)
    return S3Storage(OutputSpec(bucket="adapters", endpoint_url=server.endpoint, addressing_style="path"))


def adapter(folder, marker: str):
    """An adapter folder whose every file says which trainer wrote it."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ADAPTER_FILES:
        (folder / name).write_bytes(f"{name} by {marker}\n".encode() * 2000)
    # peft's config, which publishing points at the base model
    (folder / "adapter_config.json").write_text(json.dumps(
        {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj"], "base_model_name_or_path": "", "by": marker}))
    return folder


def objects_match_manifest(server, run: RunLocation) -> dict:
    client = server.client()
    prefix = run.root.key + "/"
    manifest = json.loads(client.get_object(Bucket="adapters", Key=prefix + "manifest.json")["Body"].read())
    for entry in manifest["files"]:
        body = client.get_object(Bucket="adapters", Key=prefix + entry["path"])["Body"].read()
        assert (len(body), hashlib.sha256(body).hexdigest()) == (entry["size"], entry["sha256"]), entry["path"]
    return manifest


def publish(storage, run, folder, attempt=1):
    return publishing.publish_once(storage, run, folder, {"run": "config"}, {"steps": 1},
                                   TrainingResult(adapter_uri=run.uri), attempt=attempt)


def test_two_trainers_racing_to_publish_leave_one_manifest_and_the_loser_learns_it_lost(minio, tmp_path,
                                                                                         monkeypatch):
    storage = storage_for(minio.server, monkeypatch)
    run = RunLocation.of("adapters", "race", "team-a", "colours", "run-race")
    folders = [adapter(tmp_path / name, name) for name in ("trainer-a", "trainer-b")]
    start, outcomes = threading.Barrier(2), {}

    def race(folder):
        start.wait()
        outcomes[folder.name] = publish(storage, run, folder)

    threads = [threading.Thread(target=race, args=(f,)) for f in folders]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    won = {name for name, (_, winner) in outcomes.items() if winner}
    assert len(outcomes) == 2 and len(won) == 1, outcomes
    [winner] = won
    # The loser reports the winner's publication: one manifest, one digest, for both.
    digests = {result.manifest_sha256 for result, _ in outcomes.values()}
    assert len(digests) == 1
    manifest = objects_match_manifest(minio.server, run)
    body = minio.server.get("adapters", run.manifest.key)
    assert hashlib.sha256(body).hexdigest() in digests
    weights = minio.server.get("adapters", run.root.join("adapter_model.safetensors").key)
    assert weights.startswith(f"adapter_model.safetensors by {winner}".encode())  # no mixed set
    assert {e["path"] for e in manifest["files"]} >= set(ADAPTER_FILES)
    # A third publisher, after the fact, learns it at once and writes nothing.
    late, late_won = publish(storage, run, adapter(tmp_path / "late", "late"))
    assert not late_won and late.manifest_sha256 in digests
    assert minio.server.get("adapters", run.manifest.key) == body


def test_a_publication_cut_before_its_manifest_is_no_publication_and_the_next_attempt_completes_it(
        minio, tmp_path, monkeypatch):
    storage = storage_for(minio.server, monkeypatch)
    run = RunLocation.of("adapters", "cut", "team-a", "colours", "run-cut")
    # Attempt 1 claimed the publication and uploaded one file, then its pod was SIGKILLed.
    assert publishing.claim_publication(storage, run, attempt=1)
    minio.server.put("adapters", run.root.join("adapter_model.safetensors").key, b"half of attempt 1's upload")
    assert publishing.already_published(storage, run) is None  # nothing a reader should use

    # The next attempt finds the stale claim of an earlier attempt, takes it over, publishes it all.
    result, won = publish(storage, run, adapter(tmp_path / "attempt-2", "attempt 2"), attempt=2)
    assert won and result.manifest_sha256
    manifest = objects_match_manifest(minio.server, run)
    assert {e["path"] for e in manifest["files"]} >= set(ADAPTER_FILES)
    assert publishing.already_published(storage, run).manifest_sha256 == result.manifest_sha256


def test_a_live_claim_of_the_same_attempt_is_not_taken_over(minio, tmp_path, monkeypatch):
    """A second trainer of the same attempt (an orphaned pod still running) must not overwrite the
    files of the one that holds the claim: it waits for that manifest, and without one fails retryably."""
    storage = storage_for(minio.server, monkeypatch)
    run = RunLocation.of("adapters", "held", "team-a", "colours", "run-held")
    assert publishing.claim_publication(storage, run, attempt=3)
    assert not publishing.claim_publication(storage, run, attempt=3)
    monkeypatch.setattr(publishing, "WINNER_WAIT_SECONDS", 1)
    with pytest.raises(Exception) as caught:
        publish(storage, run, adapter(tmp_path / "orphan", "orphan"), attempt=3)
    assert caught.value.reason == "PublishContended" and caught.value.exit_code == ExitCode.STORAGE_UNAVAILABLE
    assert minio.server.keys("adapters", run.root.key + "/") == [run.claim.key]  # it uploaded nothing


def test_minio_honours_conditional_writes_and_the_probe_says_so(minio, monkeypatch):
    storage = storage_for(minio.server, monkeypatch)
    run = RunLocation.of("adapters", "probe", "team-a", "colours", "run-probe")
    assert storage.put_bytes_if_absent(b"first", run.claim)
    assert not storage.put_bytes_if_absent(b"second", run.claim)
    assert storage.conditional_writes_honoured(run.claim)
    assert minio.server.get("adapters", run.claim.key) == b"first"


def test_a_later_publisher_loses_on_moto_too(tmp_path, monkeypatch):
    """moto's S3 server (which also answers 412): a publisher that comes second finds the claim
    and the manifest before it writes anything. (The read-back fallback for stores that ignore
    If-None-Match is not exercised here: neither server at hand ignores it.)"""
    with running_s3() as server:
        server.make_bucket("adapters")
        storage = storage_for(server, monkeypatch)
        monkeypatch.setattr(publishing, "SETTLE_SECONDS", 0.1)
        run = RunLocation.of("adapters", "plain", "team-a", "colours", "run-plain")
        first, first_won = publish(storage, run, adapter(tmp_path / "first", "first"))
        second, second_won = publish(storage, run, adapter(tmp_path / "second", "second"))
        assert first_won and not second_won and second.manifest_sha256 == first.manifest_sha256
        objects_match_manifest(server, run)


def test_the_operator_needs_the_manifest_digest_to_say_succeeded():
    job = qlorajob(spec={"backoffLimit": 2})
    tj = trainer_job(job, finished="Complete")
    verified = pod(tj, phase="Succeeded", state=terminated(0, result_message()))
    status, _ = derive_status(job, observe(job, [tj], [verified]), OperatorSettings(retry_delay=0))
    assert status.phase == "Succeeded" and status.result.manifest_sha256 == "ab" * 32
    unverified = pod(tj, phase="Succeeded", state=terminated(0, result_message(manifest=False)))
    status, _ = derive_status(job, observe(job, [tj], [unverified]), OperatorSettings(retry_delay=0))
    assert status.phase == "Pending" and find(status, ConditionType.SUCCEEDED) is None
    assert find(status, ConditionType.RUNNING).reason == Reason.RESULT_UNVERIFIED
    assert "attempt 2 of 3" in status.message
