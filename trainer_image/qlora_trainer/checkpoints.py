"""Resumable checkpoints in S3: <run>/checkpoints/step-<N>/, each with its manifest written last.

A pod can die in the middle of an upload, so only a folder with a manifest counts, and a
restarted pod resumes from the newest such folder (its files checked against the manifest)
instead of starting over. The Trainer's own checkpoint (adapter, optimizer, scheduler, RNG states,
trainer_state.json) is what is stored, so resuming continues the same schedule and data order.
"""

import json
import logging
import re
from pathlib import Path

from qlora_trainer.publishing import MANIFEST, files_under, sha256_file, upload_with_manifest
from qlora_trainer.storage import S3Storage, S3Uri

log = logging.getLogger(__name__)

_STEP = re.compile(r"^step-(\d+)$")
KEEP = 2  # complete checkpoints kept: the newest, and one more in case the newest is unreadable


class CheckpointStore:
    def __init__(self, storage: S3Storage, root: S3Uri):
        self.storage = storage
        self.root = root

    def folder(self, step: int) -> S3Uri:
        return self.root.join(f"step-{step}")

    def steps(self) -> list[int]:
        """Steps of the checkpoint folders in S3, complete or not, newest first."""
        found = (_STEP.match(name) for name in self.storage.list_folders(self.root))
        return sorted((int(m.group(1)) for m in found if m), reverse=True)

    def complete_steps(self) -> list[int]:
        return [s for s in self.steps() if self.storage.exists(self.folder(s).join(MANIFEST))]

    def save(self, local_dir: Path, step: int) -> None:
        upload_with_manifest(self.storage, self.folder(step), files_under(local_dir), {"step": step})
        log.info("checkpoint step %d saved to %s", step, self.folder(step))
        for old in self.complete_steps()[KEEP:]:
            self.storage.delete_folder(self.folder(old))

    def restore_latest(self, dest_root: Path) -> tuple[Path, int] | None:
        """Download the newest complete checkpoint as `dest_root/checkpoint-<N>` (Trainer's layout)."""
        for step in self.complete_steps():
            dest = self.restore(step, dest_root)
            if dest is not None:
                return dest, step
        return None

    def restore(self, step: int, dest_root: Path) -> Path | None:
        """Download checkpoint `step` and check it against its manifest (None if it does not match).
        Under data parallel, rank 0 picks the step and every rank restores that one."""
        folder = self.folder(step)
        dest = dest_root / f"checkpoint-{step}"
        manifest = json.loads(self.storage.get_bytes(folder.join(MANIFEST)) or b"{}")
        self.storage.download_folder(folder, dest)
        bad = [e["path"] for e in manifest.get("files", [])
               if not (dest / e["path"]).is_file() or sha256_file(dest / e["path"]) != e["sha256"]]
        if bad:
            log.warning("checkpoint step %d in %s does not match its manifest (%s); trying an older one",
                        step, folder, ", ".join(bad[:3]))
            return None
        return dest
