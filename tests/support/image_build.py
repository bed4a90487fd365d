"""Build operator/Dockerfile here, with no container engine and no registry: buildah (vfs storage,
chroot isolation) against base images made from Debian packages with mmdebstrap.

The Dockerfile's two bases are stood in for by images of the same Debian release:
- build: `mmdebstrap --variant=minbase` with python3 and python3-venv (what debian:bookworm-slim
  plus the Dockerfile's apt-get line gives);
- runtime: `mmdebstrap --variant=extract` of python3 and its dependencies, unpacked and not
  configured: Debian's python3 with no shell and no package manager configured, as distroless is.
Their root filesystems are cached as tarballs under ~/.cache/qlora-operator/images (made once,
about 90 s); buildah's storage is a fresh temporary folder per build, so nothing accumulates.

`run_rootfs` starts the image's entrypoint the way a pod with the chart's securityContext would:
the image's own Entrypoint, Env, WorkingDir and User, a read-only root, a tmpfs at /tmp, and a
ServiceAccount token, CA and namespace at the in-cluster path.
"""

import contextlib
import hashlib
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

CACHE = Path.home() / ".cache" / "qlora-operator" / "images"
SUITE = "bookworm"  # Debian 12: python3 is 3.11, as in the Dockerfile's bases
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
TOOLS = ("buildah", "mmdebstrap", "unshare", "chroot")
# The build stage fetches wheels over HTTPS. When this machine reaches the index through a proxy
# that re-signs TLS, only its own trust store knows that CA: the stand-in build base gets a copy
# (the runtime base does not).
HOST_TRUST_STORE = Path("/etc/ssl/certs/ca-certificates.crt")


@dataclass(frozen=True)
class DebianBase:
    name: str
    variant: str
    packages: tuple[str, ...]

    def rootfs_tarball(self) -> Path:
        """The root filesystem as a tarball, made by mmdebstrap once per (suite, variant, packages, arch)."""
        key = hashlib.sha256(f"{SUITE} {self.variant} {self.packages} {platform.machine()}".encode()).hexdigest()[:12]
        tarball = CACHE / f"{self.name.split('/')[-1].replace(':', '-')}-{key}.tar"
        if not tarball.exists():
            CACHE.mkdir(parents=True, exist_ok=True)
            partial = tarball.with_suffix(f".{os.getpid()}.partial.tar")  # concurrent sessions: last rename wins
            run(["mmdebstrap", "--quiet", f"--variant={self.variant}", "--include=" + ",".join(self.packages),
                 SUITE, str(partial)], timeout=900)
            partial.rename(tarball)
        return tarball


BUILD_BASE = DebianBase("localhost/qlora-build-base:bookworm", "minbase", ("python3", "python3-venv", "ca-certificates"))
RUNTIME_BASE = DebianBase("localhost/qlora-runtime-base:bookworm", "extract", ("python3",))


def missing_tools() -> list[str]:
    return [tool for tool in TOOLS if shutil.which(tool) is None]


def run(argv: list[str], timeout: float = 600, **kwargs) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kwargs)
    if result.returncode != 0:
        raise RuntimeError(f"{shlex.join(argv)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n"
                           f"{result.stderr[-3000:]}")
    return result.stdout


class Buildah:
    """buildah with its own storage under `root`: vfs (no overlay mounts needed) and chroot
    isolation (the OCI runtime isolation does not start here)."""

    def __init__(self, root: Path):
        self.argv = ["buildah", "--root", str(root / "storage"), "--runroot", str(root / "run"),
                     "--storage-driver", "vfs"]

    def __call__(self, *args: str, timeout: float = 600) -> str:
        return run([*self.argv, *args], timeout=timeout).strip()

    def import_base(self, base: DebianBase, extra_files: dict[str, Path] | None = None) -> None:
        container = self("from", "scratch")
        try:
            rootfs = Path(self("mount", container))
            run(["tar", "-C", str(rootfs), "-xf", str(base.rootfs_tarball())])
            for path, source in (extra_files or {}).items():
                shutil.copyfile(source, rootfs / path.lstrip("/"))
            self("umount", container)
            self("commit", "--quiet", container, base.name)
        finally:
            self("rm", container)

    def build(self, context: Path, dockerfile: Path, tag: str) -> None:
        self("bud", "--isolation", "chroot", "--pull-never", "--quiet",
             "--file", str(dockerfile), "--ignorefile", str(dockerfile.with_name(dockerfile.name + ".dockerignore")),
             "--build-arg", f"BUILD_IMAGE={BUILD_BASE.name}", "--build-arg", f"RUNTIME_IMAGE={RUNTIME_BASE.name}",
             "--tag", tag, str(context), timeout=1200)

    def config(self, image: str) -> dict:
        """The image's OCI config: User, Env, Entrypoint, Cmd, WorkingDir."""
        return json.loads(self("inspect", "--type", "image", image))["OCIv1"]["config"]

    @contextlib.contextmanager
    def rootfs(self, image: str) -> Iterator[Path]:
        """The image's root filesystem, mounted through a working container."""
        container = self("from", "--pull-never", image)
        try:
            yield Path(self("mount", container))
        finally:
            self("umount", container)
            self("rm", container)


def build_operator_image(repo: Path, work: Path, tag: str) -> Buildah:
    buildah = Buildah(work)
    trust = {str(HOST_TRUST_STORE): HOST_TRUST_STORE} if HOST_TRUST_STORE.exists() else {}
    buildah.import_base(BUILD_BASE, extra_files=trust)
    buildah.import_base(RUNTIME_BASE)
    buildah.build(repo, repo / "operator" / "Dockerfile", tag)
    return buildah


# Run in the private mount namespace after the mounts: enter the root, drop to the image's user,
# exec the entrypoint with exactly the image's environment (the runtime image has no shell or chroot).
LAUNCH = """
import json, os, sys
spec = json.loads(sys.argv[1])
os.chroot(spec["root"])
os.chdir(spec["workdir"])
os.setgroups([])
os.setgid(spec["gid"])
os.setuid(spec["uid"])
os.execvpe(spec["argv"][0], spec["argv"], spec["env"])  # PATH from the image's env, as runtimes do
"""


def run_rootfs(rootfs: Path, config: dict, args: list[str], env: dict[str, str],
               service_account: dict[str, bytes], log: Path, command: list[str] | None = None) -> subprocess.Popen:
    """Start the image's entrypoint (or `command`, as a pod's `command:` replaces it) in `rootfs` as
    a pod with a read-only root would run it, in a private mount namespace (its mounts vanish with
    it). The network is the host's."""
    secrets = log.parent / "serviceaccount"
    secrets.mkdir(exist_ok=True)
    for name, content in service_account.items():
        (secrets / name).write_bytes(content)
    (rootfs / SERVICE_ACCOUNT_DIR.lstrip("/")).mkdir(parents=True, exist_ok=True)  # the container layer, not the image
    user, _, group = (config.get("User") or "0").partition(":")
    spec = {
        "root": str(rootfs),
        "workdir": config.get("WorkingDir") or "/",
        "uid": int(user), "gid": int(group or user),
        "argv": [*(command if command is not None else config.get("Entrypoint") or []), *args],
        "env": {**dict(item.split("=", 1) for item in config.get("Env") or []), **env},
    }
    root = shlex.quote(str(rootfs))
    script = f"""set -eu
mount --bind {root} {root}
mount -o remount,bind,ro {root}
mount -t tmpfs -o mode=1777,size=64m tmpfs {root}/tmp
mount --bind -o ro {shlex.quote(str(secrets))} {root}{SERVICE_ACCOUNT_DIR}
exec {shlex.quote(sys.executable)} -c {shlex.quote(LAUNCH)} {shlex.quote(json.dumps(spec))}
"""
    with open(log, "wb") as out:
        return subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                                stdout=out, stderr=subprocess.STDOUT, cwd="/", env={"PATH": os.environ["PATH"]})
