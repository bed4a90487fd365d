"""The local image table: which host program a container image name stands for.

There is no container engine, so an image is only a name for an ENTRYPOINT and a CMD on this host.
A reference is matched on its repository path with the registry host, tag and digest removed
(`ghcr.io/acme/qlora-operator/trainer:0.1` -> `acme/qlora-operator/trainer`), against each entry's
glob patterns in order. The argv then follows the Kubernetes rules exactly:

    command and args set   -> command + args
    only command           -> command
    only args              -> ENTRYPOINT + args
    neither                -> ENTRYPOINT + CMD

and argv[0] is looked up in the entry's `binaries` (so `python` in a python-image pod is this
interpreter). A name matching no entry behaves like an image whose pull fails: the container waits
with ErrImagePull, then ImagePullBackOff.

    image (repository glob)                                 ENTRYPOINT                      CMD
    qlora-trainer, */qlora-trainer,
      qlora-operator/trainer, */qlora-operator/trainer      [python, -m, qlora_trainer]     []
    qlora-operator/operator, */qlora-operator/operator      [python, -m, qlora_operator]    []
    python, */python                                        -                               [python3]
    busybox, */busybox, alpine, */alpine,
      debian, */debian, ubuntu, */ubuntu                    -                               [sh]
    pause, */pause                                          [sleep, infinity]               []
    qlora-fake-trainer, */qlora-fake-trainer                [python, tests/support/fake_trainer.py]  []

`python`/`python3` mean the agent's own interpreter (the venv with the project installed); `sh`
means /bin/sh. `--image-table FILE` (JSON or YAML list of entries with the same fields as
ImageEntry) adds entries in front of these.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

_REPO = Path(__file__).resolve().parents[3]


@dataclass(frozen=True)
class ImageEntry:
    name: str
    patterns: tuple[str, ...]
    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    binaries: dict[str, str] = field(default_factory=dict)

    @property
    def image_id(self) -> str:
        digest = hashlib.sha256(json.dumps([self.entrypoint, self.cmd]).encode()).hexdigest()
        return f"local-image-table://{self.name}@sha256:{digest}"


class ImageNotInTable(LookupError):
    def __init__(self, image: str):
        super().__init__(
            f'image "{image}" is not in the node agent\'s local image table (it runs containers as '
            "host processes and cannot pull images)"
        )


def _python_binaries() -> dict[str, str]:
    return {"python": sys.executable, "python3": sys.executable}


def default_entries() -> list[ImageEntry]:
    py = _python_binaries()
    shell = {"sh": "/bin/sh", "bash": "/bin/bash" if Path("/bin/bash").exists() else "/bin/sh"}
    return [
        ImageEntry(
            "qlora-trainer",
            ("qlora-trainer", "*/qlora-trainer", "qlora-operator/trainer", "*/qlora-operator/trainer"),
            entrypoint=(sys.executable, "-m", "qlora_trainer"),
            binaries=py,
        ),
        # The Helm chart's Deployment (`ghcr.io/qlora-operator/operator:<appVersion>`).
        ImageEntry(
            "qlora-operator",
            ("qlora-operator/operator", "*/qlora-operator/operator"),
            entrypoint=(sys.executable, "-m", "qlora_operator"),
            binaries=py,
        ),
        ImageEntry("python", ("python", "*/python"), cmd=("python3",), binaries=py),
        ImageEntry(
            "busybox",
            ("busybox", "*/busybox", "alpine", "*/alpine", "debian", "*/debian", "ubuntu", "*/ubuntu"),
            cmd=("sh",),
            binaries={**shell, **py},
        ),
        ImageEntry("pause", ("pause", "*/pause"), entrypoint=("sleep", "infinity")),
        # The operator tests' scripted trainer (fast, no torch): tests/support/fake_trainer.py.
        ImageEntry("qlora-fake-trainer", ("qlora-fake-trainer", "*/qlora-fake-trainer"),
                   entrypoint=(sys.executable, str(_REPO / "tests" / "support" / "fake_trainer.py")),
                   binaries=py),
    ]


def repository_path(image: str) -> str:
    """`registry:5000/a/b:tag@sha256:..` -> `a/b`; `docker.io/library/busybox` -> `library/busybox`."""
    ref = image.split("@", 1)[0]
    parts = ref.split("/")
    last = parts[-1]
    if ":" in last:
        parts[-1] = last.split(":", 1)[0]
    if len(parts) > 1 and ("." in parts[0] or ":" in parts[0] or parts[0] == "localhost"):
        parts = parts[1:]
    return "/".join(parts)


class ImageTable:
    def __init__(self, entries: list[ImageEntry] | None = None):
        self.entries = list(entries) if entries is not None else default_entries()

    @classmethod
    def with_file(cls, path: str | None) -> ImageTable:
        entries = default_entries()
        if path:
            text = Path(path).read_text()
            try:
                raw = json.loads(text)
            except ValueError:
                import yaml

                raw = yaml.safe_load(text)
            extra = [
                ImageEntry(
                    e["name"],
                    tuple(e["patterns"]),
                    tuple(e.get("entrypoint", ())),
                    tuple(e.get("cmd", ())),
                    dict(e.get("binaries", {})),
                )
                for e in raw
            ]
            entries = extra + entries
        return cls(entries)

    def lookup(self, image: str) -> ImageEntry:
        repo = repository_path(image)
        for entry in self.entries:
            if any(fnmatch.fnmatchcase(repo, p) for p in entry.patterns):
                return entry
        raise ImageNotInTable(image)

    def argv(self, image: str, command: list[str] | None, args: list[str] | None) -> list[str]:
        """The host argv for a container, before $(VAR) expansion and path mapping."""
        from_image, from_pod = self.argv_parts(image, command, args)
        return from_image + from_pod

    def argv_parts(self, image: str, command: list[str] | None,
                   args: list[str] | None) -> tuple[list[str], list[str]]:
        """(what the image table supplies, what the pod spec supplies). Only the second holds
        container paths to map: the first is host paths (this venv's interpreter, say), which a
        volume mounted at /tmp must not rewrite when the checkout itself lives under /tmp."""
        entry = self.lookup(image)
        if command:
            from_image, from_pod = [], list(command) + list(args or [])
        elif args:
            from_image, from_pod = list(entry.entrypoint), list(args)
        else:
            from_image, from_pod = list(entry.entrypoint) + list(entry.cmd), []
        if not from_image and not from_pod:
            raise ValueError(f'image "{image}" has no ENTRYPOINT or CMD and the container sets no command')
        if from_image:
            from_image[0] = entry.binaries.get(from_image[0], from_image[0])
        elif from_pod[0] in entry.binaries:  # `command: [python, ...]` runs this venv's interpreter
            from_image, from_pod = [entry.binaries[from_pod[0]]], from_pod[1:]
        return from_image, from_pod
