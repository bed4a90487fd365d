"""Publishing: every file first, `manifest.json` (each file's size and sha256) last.

A reader that finds the manifest finds a complete adapter; one that does not, finds nothing it
should use. The same rule makes checkpoints resumable (checkpoints.py).

Exactly once: a run is published by one trainer. Before uploading a file, a publisher creates
`publish-claim.json` with a conditional write (If-None-Match: *), and the manifest is created the
same way. The claim keeps two trainers of one run (forced, or a lost pod that still runs) from
writing the same keys at once, which could leave a manifest that does not match the objects. A
trainer that finds the claim taken:
  - by an earlier attempt: that pod is gone (the operator starts attempt N+1 only once attempt N's
    pod has terminated), so it died between its first upload and its manifest; the claim is
    taken over and the complete set uploaded again;
  - by the same or a later attempt: another trainer is publishing; this one has lost, waits for
    that manifest and reports it (the run is published once), or fails retryably if none comes.
A store that ignores If-None-Match (probed once per publish: a second conditional write of the
claim must be refused) falls back to write, wait, read back: the claim names its owner's token, so
a racer that reads back someone else's token has lost. That narrows the race to the settle delay
but cannot close it: on such stores exactly-once rests on the operator running one trainer per
QLoRAJob at a time, and the last manifest written wins.
"""

import hashlib
import json
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from qlora_api import PublishedFile, TrainingResult

from qlora_trainer.errors import storage_unavailable
from qlora_trainer.phases import PhaseClock
from qlora_trainer.storage import S3Storage, S3Uri

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
CLAIM = "publish-claim.json"
# How long a loser waits for the winner's manifest: the winner is uploading the same adapter.
WINNER_WAIT_SECONDS = 600
SETTLE_SECONDS = 2.0  # stores without conditional writes: the read-back delay
UPLOAD_WORKERS = 4  # files in flight at once (storage.py sizes the connection pool for them)
OVERLAP_HASH_BYTES = 8 << 20  # files from this size are hashed on a thread beside their upload
METRICS = "metrics.json"
CONFIG = "training_config.json"
ADAPTER_CONFIG = "adapter_config.json"
MERGED = "merged"


@dataclass(frozen=True)
class RunLocation:
    """s3://<bucket>/<prefix>/<namespace>/<job name>/<runId>/ and the folders under it."""

    root: S3Uri

    @classmethod
    def of(cls, bucket: str, prefix: str, namespace: str, name: str, run_id: str) -> "RunLocation":
        return cls(S3Uri(bucket, "").join(prefix, namespace, name, run_id))

    @property
    def uri(self) -> str:
        return str(self.root) + "/"

    @property
    def manifest(self) -> S3Uri:
        return self.root.join(MANIFEST)

    @property
    def checkpoints(self) -> S3Uri:
        return self.root.join("checkpoints")

    @property
    def claim(self) -> S3Uri:
        return self.root.join(CLAIM)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def describe_file(rel: str, path: Path) -> PublishedFile:
    return PublishedFile(path=rel, size=path.stat().st_size, sha256=sha256_file(path))


def describe_files(files: dict[str, Path]) -> list[PublishedFile]:
    return [describe_file(rel, p) for rel, p in sorted(files.items())]


def files_under(folder: Path, prefix: str = "") -> dict[str, Path]:
    return {prefix + str(p.relative_to(folder)): p for p in sorted(folder.rglob("*")) if p.is_file()}


def upload_files(storage: S3Storage, root: S3Uri, files: dict[str, Path]) -> list[PublishedFile]:
    """Upload the files (no manifest); return their entries, sorted by path, for
    upload_with_manifest's `uploaded`. Files go UPLOAD_WORKERS at a time, each hashed on its worker
    just before it is sent: a checkpoint is a dozen files, most below the multipart threshold (one
    PUT each), and one after another they spent more in per-request latency and hashing than the
    store's bandwidth needs (the CLI benchmark's checkpointUpload, 1.61x its bytes at the upload
    rate). The first failure is raised once the files in flight have ended; none is left running."""
    if len(files) <= 1:
        return [_hash_and_upload(storage, root, rel, path) for rel, path in files.items()]
    with ThreadPoolExecutor(max_workers=UPLOAD_WORKERS, thread_name_prefix="upload") as pool:
        futures = [pool.submit(_hash_and_upload, storage, root, rel, path) for rel, path in sorted(files.items())]
        try:
            return [f.result() for f in futures]
        except BaseException:
            for f in futures:
                f.cancel()  # the ones not started; the running ones end before the pool closes
            raise


def _hash_and_upload(storage: S3Storage, root: S3Uri, rel: str, path: Path) -> PublishedFile:
    """The file's entry, hashed while it uploads when it is large: sha256 of an 84 MB adapter is
    0.06 s of a CPU that the upload leaves idle (hashlib and the reads release the GIL), so in
    turn it only lengthened the phase. The upload's error, if any, is raised first; the hashing
    thread has ended by then."""
    size = path.stat().st_size  # a file gone since the listing fails here, by name
    if size < OVERLAP_HASH_BYTES:
        entry = describe_file(rel, path)
        storage.upload_file(path, root.join(rel))
        return entry
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="sha256") as hasher:
        digest = hasher.submit(sha256_file, path)
        storage.upload_file(path, root.join(rel))
        sha = digest.result()
    if path.stat().st_size != size:  # written to while it went up: its entry would not describe the object
        raise RuntimeError(f"{path} changed while it was uploaded ({size} -> {path.stat().st_size} bytes)")
    return PublishedFile(path=rel, size=size, sha256=sha)


def upload_with_manifest(storage: S3Storage, root: S3Uri, files: dict[str, Path], extra: dict,
                         uploaded: list[PublishedFile] = ()) -> tuple[bytes, list[PublishedFile]]:
    """Upload the files, then the manifest (which lists `uploaded` too: files already sent by
    upload_files); return the manifest's bytes and its file entries."""
    entries = sorted([*uploaded, *upload_files(storage, root, files)], key=lambda e: e.path)
    manifest = {**extra, "files": [e.model_dump() for e in entries]}
    body = json.dumps(manifest, indent=2, sort_keys=True).encode()
    storage.put_bytes(body, root.join(MANIFEST))
    return body, entries


def server_model_name(model_uri: str) -> str:
    """The base model as a server resolves it: a Hugging Face id for hf://, else the spec's URI."""
    return model_uri.removeprefix("hf://") if model_uri.startswith("hf://") else model_uri


def point_adapter_at_base(adapter_dir: Path, base_model: str, revision: str | None) -> dict:
    """adapter_config.json names the base a server can find (peft wrote the trainer's scratch folder),
    and the exact revision trained on; returns the config as published."""
    path = adapter_dir / ADAPTER_CONFIG
    config = json.loads(path.read_text())
    config["base_model_name_or_path"] = base_model
    # A hub commit is a revision a server can ask for; our sha256: fingerprints of s3/pvc folders are not.
    config["revision"] = revision if revision and not revision.startswith("sha256:") else None
    path.write_text(json.dumps(config, indent=2, sort_keys=True))
    return config


def adapter_facts(adapter_config: dict) -> dict:
    """What a server needs from the adapter's own config: rank, alpha and the wrapped modules."""
    modules = adapter_config.get("target_modules") or []
    # peft may write every wrapped layer's full path (model.layers.0.mlp.down_proj, ...): servers
    # match on the last part, and 28 layers x 7 paths do not belong in a status.
    leaves = {m.rsplit(".", 1)[-1] for m in ([modules] if isinstance(modules, str) else modules)}
    return {
        "lora_rank": adapter_config.get("r"),
        "lora_alpha": adapter_config.get("lora_alpha"),
        "target_modules": sorted(leaves),
    }


def write_merged_manifest(merged_dir: Path) -> str:
    """merged/manifest.json: the merged model's own file list, for servers that take only it."""
    entries = describe_files(files_under(merged_dir))
    body = json.dumps({"files": [e.model_dump() for e in entries if e.path != MANIFEST]}, indent=2, sort_keys=True)
    (merged_dir / MANIFEST).write_text(body)
    return hashlib.sha256(body.encode()).hexdigest()


def publish(
    storage: S3Storage,
    run: RunLocation,
    adapter_dir: Path,
    resolved_config: dict,
    metrics: dict,
    result: TrainingResult,
    merged_dir: Path | None = None,
    phases: PhaseClock | None = None,
    attempt: int = 1,
) -> TrainingResult:
    """The run's one publication: this trainer's, or the winner's if it lost a race (publish_once)."""
    published, _ = publish_once(storage, run, adapter_dir, resolved_config, metrics, result, merged_dir,
                                phases=phases, attempt=attempt)
    return published


def publish_once(storage: S3Storage, run: RunLocation, adapter_dir: Path, resolved_config: dict, metrics: dict,
                 result: TrainingResult, merged_dir: Path | None = None, phases: PhaseClock | None = None,
                 attempt: int = 1) -> tuple[TrainingResult, bool]:
    """(the run's publication, whether this trainer made it). Under the claim: adapter, tokenizer
    (and the merged model) first, then config and metrics, the manifest last and only if absent.
    The bulk goes first so that the config's `phases` section can hold the upload's time."""
    phases = phases or PhaseClock()
    with phases.phase("publish") as phase:
        claimed = claim_publication(storage, run, attempt)
        if claimed:
            adapter_config = point_adapter_at_base(adapter_dir, result.base_model or "", result.base_model_revision)
            facts = adapter_facts(adapter_config)
            files = files_under(adapter_dir)
            merged = {}
            if merged_dir is not None:
                merged = {"merged_model_uri": f"{run.uri}{MERGED}/",
                          "merged_model_manifest_uri": str(run.root.join(MERGED, MANIFEST)),
                          "merged_model_manifest_sha256": write_merged_manifest(merged_dir)}
                files.update(files_under(merged_dir, f"{MERGED}/"))
            uploaded = upload_files(storage, run.root, files)
            phase.bytes = sum(e.size for e in uploaded)
    if not claimed:
        return _winners_result(storage, run, "another trainer of this run holds the publication claim"), False
    staging = adapter_dir.parent / "publish-extra"
    staging.mkdir(parents=True, exist_ok=True)
    # Everything after this point (two small files and the manifest) takes milliseconds.
    (staging / CONFIG).write_text(json.dumps({**resolved_config, "phases": phases.summary()}, indent=2,
                                             sort_keys=True))
    (staging / METRICS).write_text(json.dumps(metrics, indent=2, sort_keys=True))
    serving = {"baseModel": result.base_model, "baseModelRevision": result.base_model_revision,
               "loraRank": facts["lora_rank"], "loraAlpha": facts["lora_alpha"], "targetModules": facts["target_modules"],
               **({"mergedModelManifestSha256": merged["merged_model_manifest_sha256"]} if merged else {})}
    entries = sorted([*uploaded, *upload_files(storage, run.root, files_under(staging))], key=lambda e: e.path)
    manifest = {"adapterUri": run.uri, **serving, "metrics": metrics, "files": [e.model_dump() for e in entries]}
    body = json.dumps(manifest, indent=2, sort_keys=True).encode()
    if storage.exists(run.manifest) or not storage.put_bytes_if_absent(body, run.manifest):
        # A manifest write that landed as the store went away is refused on its retry (412): the
        # manifest there is ours, byte for byte, and this trainer published.
        if storage.get_bytes(run.manifest) != body:
            # Only a trainer that ignored the claim (or a store that lost it) gets here.
            return _winners_result(storage, run, "another trainer wrote the manifest first"), False
    log.info("published %d files (%.1f MB) to %s", len(entries), sum(e.size for e in entries) / 1e6, run.uri)
    return result.model_copy(update={
        "adapter_uri": run.uri,
        "manifest_uri": str(run.manifest),
        "manifest_sha256": hashlib.sha256(body).hexdigest(),
        "files": entries,
        "total_bytes": sum(e.size for e in entries),
        **facts,
        **merged,
    }), True


def claim_publication(storage: S3Storage, run: RunLocation, attempt: int) -> bool:
    """Whether this trainer may upload the run's files (see the module docstring)."""
    token = f"{attempt}-{uuid.uuid4().hex}"
    body = json.dumps({"attempt": attempt, "token": token, "claimedAt": time.time()}).encode()
    # Read first: a store that ignores If-None-Match would let a late claimant overwrite a claim.
    if storage.get_bytes(run.claim) is None and (storage.put_bytes_if_absent(body, run.claim)
                                                 or _holds_claim(storage, run, token)):
        if storage.conditional_writes_honoured(run.claim):
            return True
        log.warning("S3 at %s ignores If-None-Match: the publication claim falls back to read-back", storage.endpoint)
        time.sleep(SETTLE_SECONDS)
        return json.loads(storage.get_bytes(run.claim) or b"{}").get("token") == token
    held = json.loads(storage.get_bytes(run.claim) or b"{}")
    if int(held.get("attempt", 0)) < attempt and storage.get_bytes(run.manifest) is None:
        log.warning("attempt %s claimed the publication of %s and never wrote its manifest; attempt %d takes over "
                    "and uploads the complete set", held.get("attempt"), run.uri, attempt)
        storage.put_bytes(body, run.claim)
        return True
    return False


def _holds_claim(storage: S3Storage, run: RunLocation, token: str) -> bool:
    """Whether the claim in the store is this trainer's own. A conditional write that landed just
    before the store went away is retried once the store is back and refused (412), the key being
    taken by that very write: without this check the trainer would think it lost to itself, wait
    for a manifest nobody writes, and fail the attempt."""
    return json.loads(storage.get_bytes(run.claim) or b"{}").get("token") == token


def _winners_result(storage: S3Storage, run: RunLocation, why: str) -> TrainingResult:
    """The loser of a publication race learns it lost, and reports the one publication there is."""
    log.warning("%s: lost the race to publish %s; waiting for the winner's manifest", why, run.uri)
    deadline = time.monotonic() + WINNER_WAIT_SECONDS
    while True:
        published = already_published(storage, run)
        if published is not None:
            log.warning("%s was published by another trainer (manifest sha256 %s); reporting that publication",
                        run.uri, published.manifest_sha256)
            return published
        if time.monotonic() > deadline:
            raise storage_unavailable(f"{run.uri}: another trainer claimed the publication and wrote no manifest in "
                                      f"{WINNER_WAIT_SECONDS} s; the next attempt publishes", "PublishContended")
        time.sleep(1.0)


def already_published(storage: S3Storage, run: RunLocation) -> TrainingResult | None:
    """The result of an earlier attempt of this run that published before its pod went away."""
    body = storage.get_bytes(run.manifest)
    if body is None:
        return None
    manifest = json.loads(body)
    entries = [PublishedFile.model_validate(e) for e in manifest.get("files", [])]
    metrics = manifest.get("metrics", {})
    merged_sha = manifest.get("mergedModelManifestSha256")
    return TrainingResult(
        adapter_uri=run.uri,
        manifest_uri=str(run.manifest),
        manifest_sha256=hashlib.sha256(body).hexdigest(),
        files=entries,
        total_bytes=sum(e.size for e in entries),
        base_model=manifest.get("baseModel"),
        base_model_revision=manifest.get("baseModelRevision"),
        lora_rank=manifest.get("loraRank"),
        lora_alpha=manifest.get("loraAlpha"),
        target_modules=manifest.get("targetModules") or [],
        merged_model_uri=f"{run.uri}{MERGED}/" if merged_sha else None,
        merged_model_manifest_uri=str(run.root.join(MERGED, MANIFEST)) if merged_sha else None,
        merged_model_manifest_sha256=merged_sha,
        **{k: metrics.get(k) for k in ("eval_loss_before", "eval_loss_after", "perplexity_before",
                                        "perplexity_after", "train_seconds", "resumed_from_step")},
    )
