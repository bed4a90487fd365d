"""Kueue on the local cluster: its CRDs and RBAC from the same Go module as its binary, and the
controller manager as a detached process that authenticates as its own ServiceAccount.

    python -m qlora_localcluster up --kueue      # or: kueue.ensure_running(LocalCluster())

Kueue only manages Jobs labelled `kueue.x-k8s.io/queue-name` (manageJobsWithoutQueueName: false,
and only the batch/job integration), so the other tests that share the cluster never meet it.

It runs without its admission webhooks, on purpose:
- the API server reaches a webhook through a Service; without kube-proxy here, a webhook would
  have to be a URL on loopback, and Kueue's internal certificate manager issues its serving cert
  for `kueue-webhook-service.kueue-system.svc` only (with its own certificates instead, Kueue reads
  its metrics certificate from a fixed path outside any state directory);
- on a shared cluster a Job webhook (failurePolicy Fail) would make every Job create of every test
  depend on this one process.
What the Job webhook would enforce for our Jobs (created suspended when they carry a queue name)
the operator does itself. Kueue's cert rotator still insists on injecting its CA into the
conversion webhooks of five CRDs, so those get the loopback URL the kustomize patches would have
given them a Service for; only requests for the older v1beta1 would ever use it (nothing here does:
everything speaks v1beta2, the storage version).
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import yaml

from . import build, processes
from .cluster import LocalCluster
from .processes import Component

NAMESPACE = "kueue-system"
SERVICE_ACCOUNT = "kueue-controller-manager"
NAME_PREFIX = "kueue-"  # what Kueue's kustomization (config/default) prefixes every name with
# Loopback ports away from the cluster's own and the demo operator's.
WEBHOOK_PORT = 19443
HEALTH_PORT = 19081
METRICS_PORT = 19082
COMPONENT = "kueue"
VERSION_LABEL = "app.kubernetes.io/version"
# The RBAC that the controller manager itself needs (config/components/rbac); the rest of that
# folder are optional roles for users (job editors, queue viewers, ...).
MANAGER_RBAC = ["service_account.yaml", "role.yaml", "role_binding.yaml", "leader_election_role.yaml",
                "leader_election_role_binding.yaml", "manager_secrets_role.yaml",
                "manager_secrets_role_binding.yaml"]


def module_dir() -> Path:
    """Kueue's source in the Go module cache, at the version build.py builds (downloaded if absent)."""
    spec = f"sigs.k8s.io/kueue@{build.KUEUE_VERSION}"
    go = shutil.which("go") or "/usr/local/go/bin/go"
    out = subprocess.run([go, "mod", "download", "-json", spec], capture_output=True, text=True, check=True,
                         timeout=300, cwd="/")
    return Path(json.loads(out.stdout)["Dir"])


def _load(path: Path):
    return yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # 9x faster


def crds(source: Path) -> list[dict]:
    """The CRD bases with the conversion stanzas of the kustomize patches, pointed at a URL, and
    labelled with the version (so a later start can tell they are installed already)."""
    folder = source / "config" / "components" / "crd"
    kustomization = _load(folder / "kustomization.yaml")
    objs = {}
    for path in kustomization["resources"]:
        crd = _load(folder / path)
        crd["metadata"].setdefault("labels", {})[VERSION_LABEL] = build.KUEUE_VERSION
        objs[crd["metadata"]["name"]] = crd
    for patch in kustomization.get("patches") or []:
        partial = _load(folder / patch["path"])
        conversion = partial["spec"]["conversion"]
        client = conversion["webhook"]["clientConfig"]
        client["url"] = f"https://127.0.0.1:{WEBHOOK_PORT}{client.pop('service')['path']}"
        objs[partial["metadata"]["name"]]["spec"]["conversion"] = conversion
    return list(objs.values())


def manager_rbac(source: Path) -> list[dict]:
    """The controller manager's ServiceAccount, roles and bindings, named as config/default names them."""
    folder = source / "config" / "components" / "rbac"
    objs = [_load(folder / name) for name in MANAGER_RBAC]
    for obj in objs:
        meta = obj["metadata"]
        meta["name"] = NAME_PREFIX + meta["name"]
        if "namespace" in meta:
            meta["namespace"] = NAMESPACE
        if "roleRef" in obj:
            obj["roleRef"]["name"] = NAME_PREFIX + obj["roleRef"]["name"]
        for subject in obj.get("subjects") or []:
            subject["name"], subject["namespace"] = NAME_PREFIX + subject["name"], NAMESPACE
    return objs


def configuration() -> dict:
    """Kueue's Configuration: only labelled batch/v1 Jobs, loopback ports, no visibility API server."""
    return {
        "apiVersion": "config.kueue.x-k8s.io/v1beta2",
        "kind": "Configuration",
        "namespace": NAMESPACE,
        "health": {"healthProbeBindAddress": f"127.0.0.1:{HEALTH_PORT}"},
        "metrics": {"bindAddress": f"127.0.0.1:{METRICS_PORT}"},
        "webhook": {"host": "127.0.0.1", "port": WEBHOOK_PORT},
        # One process, and a pid file plus a lock keep it one: no Lease to wait for after a restart.
        "leaderElection": {"leaderElect": False},
        "manageJobsWithoutQueueName": False,
        "integrations": {"frameworks": ["batch/job"]},
        # The visibility API would be an aggregated API server that nobody here registers;
        # MultiKueue needs other clusters.
        "featureGates": {"VisibilityOnDemand": False, "MultiKueue": False},
    }


def component(cluster: LocalCluster, binary: str | Path = "kueue") -> Component:
    state = cluster.state_dir / "kueue"
    return Component(COMPONENT, [str(binary), f"--config={state / 'config.yaml'}", "--zap-log-level=info"],
                     cluster.state_dir, env={"KUBECONFIG": str(state / "kubeconfig")})


def ready(timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{HEALTH_PORT}/readyz", timeout=timeout) as r:
            return r.status == 200
    except OSError:
        return False


def ensure_running(cluster: LocalCluster, timeout: float = 120.0) -> bool:
    """Installs Kueue's CRDs and RBAC and starts its controller manager unless it runs already.
    Returns True if this call started it (so the caller may stop it again)."""
    binary = build.ensure_binaries([COMPONENT])[COMPONENT]
    comp = component(cluster, binary)
    with _lock(cluster):
        if processes.running_pid(comp.pidfile):
            _wait_ready(cluster, comp, timeout)
            return False
        source = module_dir()
        _apply(cluster, [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}])
        definitions = crds(source)
        if _installed_crds(cluster) != {c["metadata"]["name"] for c in definitions}:
            _apply(cluster, definitions)  # ~10 s on 2 busy cores: the Workload schema alone is 19k lines
        _apply(cluster, manager_rbac(source))
        # Kueue's cert rotator updates this Secret (it may not create it), as config/components/internalcert does.
        _apply(cluster, [{"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                          "metadata": {"name": f"{NAME_PREFIX}webhook-server-cert", "namespace": NAMESPACE}}])
        cluster.wait_crds_established(*[c["metadata"]["name"] for c in definitions], timeout=60)
        state = cluster.state_dir / "kueue"
        state.mkdir(parents=True, exist_ok=True)
        config = configuration()
        config["webhook"]["certDir"] = str(state / "certs")
        (state / "config.yaml").write_text(yaml.safe_dump(config))
        _write_kubeconfig(cluster, state / "kubeconfig")
        processes.start(comp)
        _wait_ready(cluster, comp, timeout)
        return True


def stop(cluster: LocalCluster) -> str:
    return processes.stop(component(cluster), timeout=20.0)


def _wait_ready(cluster: LocalCluster, comp: Component, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        _mount_cert_secret(cluster)
        if not processes.running_pid(comp.pidfile):
            raise RuntimeError(f"kueue exited before it was ready; last lines of {comp.log}:\n"
                               + processes.log_tail(comp))
        time.sleep(0.5)
    raise RuntimeError(f"kueue: no /readyz after {timeout:.0f} s; last lines of {comp.log}:\n"
                       + processes.log_tail(comp))


def _installed_crds(cluster: LocalCluster) -> set[str]:
    """Kueue's CRDs on the server that carry this version's label."""
    out = _kubectl(cluster, "get", "crd", "-l", f"{VERSION_LABEL}={build.KUEUE_VERSION}", "-o", "name")
    return {line.removeprefix("customresourcedefinition.apiextensions.k8s.io/")
            for line in out.split() if line.endswith(".kueue.x-k8s.io")}


def _mount_cert_secret(cluster: LocalCluster) -> None:
    """What the kubelet's Secret volume does for Kueue's pod: the webhook server's certificate,
    which Kueue's cert rotator writes into a Secret, as files in the certificate folder. Kueue
    waits for them before it reports ready (they are valid for years; a restart reuses them)."""
    folder = cluster.state_dir / "kueue" / "certs"
    if (folder / "tls.crt").exists():
        return
    secret = json.loads(_kubectl(cluster, "get", "secret", f"{NAME_PREFIX}webhook-server-cert", "-n", NAMESPACE,
                                 "-o", "json"))
    data = secret.get("data") or {}
    if not {"tls.crt", "tls.key", "ca.crt"} <= data.keys():
        return  # not generated yet
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("ca.crt", "tls.key", "tls.crt"):  # tls.crt last: its presence means complete
        path = folder / name
        path.write_bytes(base64.b64decode(data[name]))
        path.chmod(0o600)


def _write_kubeconfig(cluster: LocalCluster, path: Path) -> None:
    """Kueue authenticates as its ServiceAccount, so its RBAC from the module is what is checked."""
    token = _kubectl(cluster, "create", "token", SERVICE_ACCOUNT, "-n", NAMESPACE, "--duration=720h").strip()
    admin = yaml.safe_load(cluster.kubeconfig.read_text())
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "clusters": admin["clusters"],
        "users": [{"name": SERVICE_ACCOUNT, "user": {"token": token}}],
        "contexts": [{"name": "kueue", "context": {"cluster": admin["clusters"][0]["name"], "user": SERVICE_ACCOUNT}}],
        "current-context": "kueue",
    }))
    path.chmod(0o600)


def _apply(cluster: LocalCluster, objs: list[dict]) -> None:
    # Server-side: the Workload CRD alone is larger than client-side apply's annotation allows.
    _kubectl(cluster, "apply", "--server-side", "--force-conflicts", "--field-manager=qlora-localcluster",
             "-f", "-", input="\n---\n".join(json.dumps(o) for o in objs))


def _kubectl(cluster: LocalCluster, *args: str, input: str | None = None) -> str:
    result = cluster.kubectl(*args, input=input)
    if result.returncode != 0:
        raise RuntimeError(f"kubectl {' '.join(args[:3])}: {result.stderr.strip()}")
    return result.stdout


@contextlib.contextmanager
def _lock(cluster: LocalCluster):
    """Test sessions sharing one cluster start Kueue at most once."""
    cluster.state_dir.mkdir(parents=True, exist_ok=True)
    with open(cluster.state_dir / "kueue.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield
