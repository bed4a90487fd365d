"""Build the local cluster's binaries from Go modules into a per-user cache, once per version.

The Kubernetes components come from the wrapper module in `localcluster/` (go.mod pins
k8s.io/kubernetes and every staging module), so `go build` there needs nothing but the Go module
proxy. MinIO and helm are separate modules installed at pinned versions. Each binary lands in
`<cache>/bin/<name>-<version>/<name>`; one that is already there is never rebuilt.

    python -m qlora_localcluster build
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

KUBERNETES_VERSION = "v1.36.3"
ETCD_VERSION = "v3.6.8"  # what k8s.io/kubernetes v1.36.3 selects; go.mod requires the same
# MinIO has no semver tags: this is the pseudo-version that @latest resolved to when pinned.
MINIO_VERSION = "v0.0.0-20260212201848-7aac2a2c5b7c"
HELM_VERSION = "v4.3.1"
KUEUE_VERSION = "v0.17.0"

WRAPPER_MODULE_DIR = Path(__file__).resolve().parent.parent  # localcluster/, holds go.mod
KSTATUS_MODULE_DIR = WRAPPER_MODULE_DIR / "kstatus"  # a module of its own: cli-utils moves no cluster pin
CLI_UTILS_VERSION = "v0.37.2"  # sigs.k8s.io/cli-utils, whose pkg/kstatus Flux's health checks use

# A release build sets these; without them the server reports `v0.0.0-master+$Format:%H$`, which
# kubectl and helm cannot parse. The fixed date keeps builds reproducible.
_VERSION_PKG = "k8s.io/component-base/version"
KUBERNETES_LDFLAGS = " ".join(
    [
        "-s -w",
        f"-X {_VERSION_PKG}.gitVersion={KUBERNETES_VERSION}",
        f"-X {_VERSION_PKG}.gitMajor={KUBERNETES_VERSION[1:].split('.')[0]}",
        f"-X {_VERSION_PKG}.gitMinor={KUBERNETES_VERSION[1:].split('.')[1]}",
        f"-X {_VERSION_PKG}.gitTreeState=clean",
        f"-X {_VERSION_PKG}.buildDate=2026-01-01T00:00:00Z",
    ]
)


@dataclass(frozen=True)
class GoBinary:
    """One executable: either a package of the wrapper module or a `go install`ed module."""

    name: str
    version: str
    package: str  # for wrapper binaries: the import path built in localcluster/
    install: str | None = None  # for standalone modules: "module/path/cmd@version"
    ldflags: str = "-s -w"
    module_dir: Path | None = None  # for a small module of our own in localcluster/: `go build` there
    test_tool: bool = False  # needed by the test suite only: `make demo` does not build it


def _source_version(base: str, module_dir: Path) -> str:
    """`base` plus a digest of our module's sources, so that editing them builds a new binary."""
    digest = hashlib.sha256()
    for path in sorted(module_dir.glob("*")):
        if path.suffix in (".go", ".mod", ".sum"):
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return f"{base}-{digest.hexdigest()[:10]}"


BINARIES: tuple[GoBinary, ...] = (
    GoBinary("etcd", ETCD_VERSION, "./cmd/etcd"),
    GoBinary("kube-apiserver", KUBERNETES_VERSION, "k8s.io/kubernetes/cmd/kube-apiserver"),
    GoBinary("kube-controller-manager", KUBERNETES_VERSION, "k8s.io/kubernetes/cmd/kube-controller-manager"),
    GoBinary("kube-scheduler", KUBERNETES_VERSION, "k8s.io/kubernetes/cmd/kube-scheduler"),
    GoBinary("kubectl", KUBERNETES_VERSION, "k8s.io/kubernetes/cmd/kubectl"),
    GoBinary("minio", MINIO_VERSION, "", install=f"github.com/minio/minio@{MINIO_VERSION}"),
    # Helm's release build stamps its version the same way; `go install` alone reports "v4.3".
    GoBinary("helm", HELM_VERSION, "", install=f"helm.sh/helm/v4/cmd/helm@{HELM_VERSION}",
             ldflags=f"-s -w -X helm.sh/helm/v4/internal/version.version={HELM_VERSION}"
             " -X helm.sh/helm/v4/internal/version.gitTreeState=clean"),
    GoBinary("kstatus", _source_version(CLI_UTILS_VERSION, KSTATUS_MODULE_DIR), ".", module_dir=KSTATUS_MODULE_DIR,
             test_tool=True),
    # Kueue (job queueing); its CRDs and RBAC are read from the same module's source in the Go
    # module cache (see kueue.py), so binary and manifests are always one version.
    GoBinary("kueue", KUEUE_VERSION, "", install=f"sigs.k8s.io/kueue/cmd/kueue@{KUEUE_VERSION}",
             ldflags=f"-s -w -X sigs.k8s.io/kueue/pkg/version.GitVersion={KUEUE_VERSION}", test_tool=True),
)


def cache_dir() -> Path:
    if os.environ.get("QLORA_CACHE_DIR"):
        return Path(os.environ["QLORA_CACHE_DIR"])
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "qlora-operator"


def binary_path(binary: GoBinary, cache: Path | None = None) -> Path:
    return (cache or cache_dir()) / "bin" / f"{binary.name}-{binary.version}" / binary.name


def ensure_binaries(names: list[str] | None = None, cache: Path | None = None) -> dict[str, Path]:
    """Return {name: path} for every binary, building those not yet in the cache."""
    wanted = [b for b in BINARIES if names is None or b.name in names]
    cache = cache or cache_dir()
    paths = {b.name: binary_path(b, cache) for b in wanted}
    missing = [b for b in wanted if not paths[b.name].exists()]
    if missing:
        with _build_lock(cache):
            # Another process may have built them while this one waited for the lock.
            missing = [b for b in missing if not paths[b.name].exists()]
            if missing:
                _build(missing, cache)
    return paths


@contextlib.contextmanager
def _build_lock(cache: Path):
    (cache / "bin").mkdir(parents=True, exist_ok=True)
    with open(cache / "bin" / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _build(missing: list[GoBinary], cache: Path) -> None:
    go = shutil.which("go") or "/usr/local/go/bin/go"
    if not Path(go).exists():
        raise RuntimeError("the Go toolchain (`go`) is needed to build the local cluster's binaries")
    # Build next to the destination (same filesystem), then rename: an interrupted build leaves a
    # temp folder, never a half-written binary under the final name.
    with tempfile.TemporaryDirectory(prefix=".build-", dir=cache / "bin") as tmp:
        out = Path(tmp)
        wrapper = [b for b in missing if b.install is None and b.module_dir is None]
        if wrapper:
            # One `go build` for all of them: the packages share most of their dependencies.
            _timed(
                ", ".join(b.name for b in wrapper),
                [go, "build", "-trimpath", "-ldflags", KUBERNETES_LDFLAGS, "-o", f"{out}/"]
                + [b.package for b in wrapper],
                cwd=WRAPPER_MODULE_DIR,
            )
        for b in missing:
            if b.module_dir is not None:
                _timed(b.name, [go, "build", "-trimpath", "-ldflags", b.ldflags, "-o", f"{out}/{b.name}", b.package],
                       cwd=b.module_dir)
            if b.install is not None:
                # No -trimpath: these build from the read-only module cache, so no work-tree path
                # leaks, and the flag would miss compile-cache entries of plain `go install`s.
                gobin = out / f"gobin-{b.name}"
                _timed(
                    b.name,
                    [go, "install", "-ldflags", b.ldflags, b.install],
                    cwd=out,
                    env={"GOBIN": str(gobin), "GOFLAGS": "-buildvcs=false"},
                )
                (gobin / b.name).rename(out / b.name)
        for b in missing:
            dest = binary_path(b, cache)
            dest.parent.mkdir(parents=True, exist_ok=True)
            (out / b.name).rename(dest)


def _timed(what: str, cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> None:
    print(f"building {what} ...", file=sys.stderr, flush=True)
    started = time.monotonic()
    result = subprocess.run(cmd, check=False, cwd=cwd, env={**os.environ, **(env or {})})
    if result.returncode != 0:
        raise RuntimeError(f"building {what} failed (exit {result.returncode}): {' '.join(cmd)}")
    print(f"built {what} in {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)


def main(test_tools: bool = False) -> None:
    """Build what the cluster runs (`make demo`), and with `test_tools` what the tests also need."""
    started = time.monotonic()
    names = [b.name for b in BINARIES if test_tools or not b.test_tool]
    for name, path in ensure_binaries(names).items():
        print(f"{name:24} {path}")
    print(f"all binaries ready in {time.monotonic() - started:.1f} s", file=sys.stderr)
