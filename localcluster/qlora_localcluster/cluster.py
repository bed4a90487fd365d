"""Start, check and stop the local cluster: etcd, kube-apiserver, kube-controller-manager,
kube-scheduler, MinIO and one node agent per GPU node, each a detached process.

    from qlora_localcluster.cluster import LocalCluster
    cluster = LocalCluster()          # state in <repo>/.localcluster, or $QLORA_CLUSTER_DIR
    cluster.up()                      # idempotent; returns once the API, the nodes and S3 are ready
    subprocess.run(["kubectl", "--kubeconfig", cluster.kubeconfig, "get", "nodes"])
    cluster.down()

The settings of the first `up` (ports, credentials, node count) are saved in
`<state>/cluster.json`, so `status`, `env` and `down` later agree with what is running.
"""

from __future__ import annotations

import dataclasses
import json
import os
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import yaml

from . import build, processes
from .pki import CertPair, ClusterPKI
from .processes import Component

REPO_ROOT = Path(__file__).resolve().parents[2]
CONTROL_PLANE = ["etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl", "minio"]


def default_state_dir() -> Path:
    return Path(os.environ.get("QLORA_CLUSTER_DIR") or REPO_ROOT / ".localcluster")


@dataclass
class ClusterSettings:
    """Ports are fixed, on loopback and away from the defaults, so a real cluster never collides."""

    etcd_client_port: int = 12379
    etcd_peer_port: int = 12380
    apiserver_port: int = 16443
    controller_manager_port: int = 20257
    scheduler_port: int = 20259
    s3_port: int = 19000
    s3_console_port: int = 19001
    node_agent_base_port: int = 20250  # node i serves its kubelet API on base + i
    gpu_nodes: int = 1
    gpus_per_node: int = 1
    gpu_product: str = "NVIDIA-H100-80GB-HBM3"
    max_pods_per_node: int = 110  # the kubelet's default; a scale benchmark raises it with the GPU count
    # Opt-in API audit log (a benchmark counts one client's requests): when non-empty, the API
    # server records every request of these users, at Metadata level, in `audit_log_path`.
    audit_users: list[str] = dataclasses.field(default_factory=list)
    service_cidr: str = "10.96.0.0/12"
    s3_access_key: str = dataclasses.field(
        default_factory=lambda: os.environ.get("MINIO_ROOT_USER", "qlora-admin"))
    s3_secret_key: str = dataclasses.field(
        default_factory=lambda: os.environ.get("MINIO_ROOT_PASSWORD", "qlora-admin-secret"))

    def node_names(self) -> list[str]:
        return [f"gpu-node-{i}" for i in range(self.gpu_nodes)]


class ComponentFailed(RuntimeError):
    """A component did not become ready; the message names it and carries the tail of its log."""


class LocalCluster:
    def __init__(self, state_dir: Path | str | None = None, **overrides):
        self.state_dir = Path(state_dir or default_state_dir()).resolve()
        saved = self.state_dir / "cluster.json"
        settings = json.loads(saved.read_text()) if saved.exists() else {}
        self.settings = ClusterSettings(**{**settings, **overrides})
        self.pki = ClusterPKI(self.state_dir / "pki", self.settings.service_cidr)

    # --- what tests and the CLI read ------------------------------------------------------------
    @property
    def kubeconfig(self) -> Path:
        return self.state_dir / "kubeconfig"

    @property
    def api_url(self) -> str:
        return f"https://127.0.0.1:{self.settings.apiserver_port}"

    @property
    def audit_log_path(self) -> Path:
        """One JSON line per request of `settings.audit_users` (none unless that is set)."""
        return self.state_dir / "logs" / "kube-apiserver-audit.log"

    @property
    def s3_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.settings.s3_port}"

    @property
    def s3_credentials(self) -> dict[str, str]:
        return {"aws_access_key_id": self.settings.s3_access_key,
                "aws_secret_access_key": self.settings.s3_secret_key}

    def kubectl(self, *args: str, input: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """The kubectl built at the server's version, as admin; output captured as text, not checked."""
        binary = build.ensure_binaries(["kubectl"])["kubectl"]
        return subprocess.run([str(binary), "--kubeconfig", str(self.kubeconfig), *args],
                              input=input, capture_output=True, text=True, timeout=timeout)

    def wait_crds_established(self, *names: str, timeout: float = 60) -> None:
        """Wait until every named CustomResourceDefinition is Established (its kinds are served).

        Not `kubectl wait --for=condition=Established`: in the instant after a CRD is created its
        `status.conditions` can be null, and kubectl then fails at once ("accessor error: <nil> is of
        the type <nil>") instead of waiting (seen once under parallel test workers)."""
        deadline = time.monotonic() + timeout
        pending = list(names)
        while True:
            result = self.kubectl("get", "crd", *pending, "-o", "json", timeout=max(5.0, deadline - time.monotonic()))
            if result.returncode == 0:
                listed = json.loads(result.stdout)
                items = listed.get("items", [listed])
                established = {item["metadata"]["name"] for item in items
                               if any(c.get("type") == "Established" and c.get("status") == "True"
                                      for c in (item.get("status") or {}).get("conditions") or [])}
                pending = [n for n in pending if n not in established]
                if not pending:
                    return
            if time.monotonic() > deadline:
                why = result.stderr.strip() if result.returncode else "not Established"
                raise TimeoutError(f"CRDs {', '.join(pending)} after {timeout:.0f} s: {why}")
            time.sleep(0.2)

    def env(self) -> dict[str, str]:
        """Environment for kubectl, helm, boto3 and the operator to reach this cluster."""
        path_dirs = self.tool_dirs()
        return {
            "KUBECONFIG": str(self.kubeconfig),
            "AWS_ENDPOINT_URL_S3": self.s3_endpoint,
            "AWS_ACCESS_KEY_ID": self.settings.s3_access_key,
            "AWS_SECRET_ACCESS_KEY": self.settings.s3_secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
            "QLORA_S3_ENDPOINT": self.s3_endpoint,
            **({"PATH": os.pathsep.join(path_dirs + [os.environ.get("PATH", "")])} if path_dirs else {}),
        }

    @staticmethod
    def tool_dirs() -> list[str]:
        """Folders of the built kubectl (the server's version) and helm, to put first on PATH."""
        tools = [build.binary_path(b) for b in build.BINARIES if b.name in ("kubectl", "helm")]
        return [str(p.parent) for p in tools if p.exists()]

    # --- lifecycle ----------------------------------------------------------------------------
    def up(self, timeout: float = 180.0) -> dict[str, float]:
        """Start whatever is not running and wait until it is ready. Returns seconds to each milestone."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        (self.state_dir / "cluster.json").write_text(json.dumps(dataclasses.asdict(self.settings), indent=2))
        bins = build.ensure_binaries(CONTROL_PLANE)
        started = time.monotonic()
        self._write_kubeconfigs()
        components = self._components(bins)
        timings: dict[str, float] = {}

        pids: dict[str, int] = {}

        def launch(name: str) -> None:
            c = components[name]
            pids[name] = processes.running_pid(c.pidfile) or 0
            if pids[name]:
                _say(f"{name}: already running (pid {pids[name]})")
            else:
                pids[name] = processes.start(c)

        def wait(name: str, what: str, ready) -> None:
            self._wait(components[name], pids[name], what, timeout, ready)

        launch("etcd")
        launch("minio")
        wait("etcd", "etcd healthy",
             lambda: _http_ok(f"http://127.0.0.1:{self.settings.etcd_client_port}/health"))
        launch("kube-apiserver")
        wait("kube-apiserver", "/readyz", lambda: self._api_ok("/readyz"))
        timings["api_ready_s"] = time.monotonic() - started
        _say(f"API ready at {self.api_url} after {timings['api_ready_s']:.1f} s")
        launch("kube-controller-manager")
        launch("kube-scheduler")
        for node in self.settings.node_names():
            launch(f"node-agent-{node}")
        wait("kube-controller-manager", "default ServiceAccount",
             lambda: self._api_ok("/api/v1/namespaces/default/serviceaccounts/default"))
        wait("kube-scheduler", "scheduler healthy",
             lambda: _https_ok(f"https://127.0.0.1:{self.settings.scheduler_port}/healthz"))
        for node in self.settings.node_names():
            wait(f"node-agent-{node}", f"node {node} Ready", lambda node=node: self._node_ready(node))
        timings["nodes_ready_s"] = time.monotonic() - started
        wait("minio", "MinIO ready",
             lambda: _http_ok(f"{self.s3_endpoint}/minio/health/ready"))
        timings["all_ready_s"] = time.monotonic() - started
        _say(f"{len(self.settings.node_names())} node(s) Ready after {timings['nodes_ready_s']:.1f} s; "
             f"cluster ready after {timings['all_ready_s']:.1f} s")
        return timings

    def down(self) -> None:
        """Stop in dependency order; the apiserver drains for >15 s after SIGTERM, so wait for it
        before taking etcd away (without etcd its shutdown only gets slower)."""
        from . import kueue  # it builds on this module

        if processes.running_pid(kueue.component(self).pidfile):
            _say(f"kueue: {kueue.stop(self)}")
        components = self._components(None)
        order = [f"node-agent-{n}" for n in self._known_nodes()] + [
            "kube-scheduler", "kube-controller-manager", "kube-apiserver", "etcd", "minio"]
        for name in order:
            timeout = 60.0 if name == "kube-apiserver" else 20.0
            _say(f"{name}: {processes.stop(components[name], timeout)}")
            if name.startswith("node-agent-"):
                left = processes.kill_pod_processes(self.state_dir / "nodes")
                if left:
                    _say(f"{name}: killed {left} pod process(es) it left behind")

    def stop_component(self, name: str, timeout: float = 60.0) -> str:
        """Stop one component (fault injection: "kube-apiserver", "minio", "node-agent-gpu-node-0", ...);
        `up()` starts it again, with whatever else is not running."""
        return processes.stop(self._components(None)[name], timeout)

    def is_ready(self) -> bool:
        return all(health == "healthy" for _, health in self.status().values())

    def status(self) -> dict[str, tuple[int | None, str]]:
        """{component: (pid or None, health)} for every component."""
        s = self.settings
        checks = {
            "etcd": lambda: _http_ok(f"http://127.0.0.1:{s.etcd_client_port}/health"),
            "kube-apiserver": lambda: self._api_ok("/readyz"),
            "kube-controller-manager": lambda: _https_ok(f"https://127.0.0.1:{s.controller_manager_port}/healthz"),
            "kube-scheduler": lambda: _https_ok(f"https://127.0.0.1:{s.scheduler_port}/healthz"),
            "minio": lambda: _http_ok(f"{self.s3_endpoint}/minio/health/ready"),
        }
        for node in self._known_nodes():
            checks[f"node-agent-{node}"] = lambda node=node: self._node_ready(node)
        result = {}
        for name, check in checks.items():
            pid = processes.running_pid(self.state_dir / "pids" / f"{name}.pid")
            result[name] = (pid, ("healthy" if check() else "not ready") if pid else "stopped")
        return result

    # --- pieces -------------------------------------------------------------------------------
    def _components(self, bins: dict[str, Path] | None) -> dict[str, Component]:
        s, st, pki = self.settings, self.state_dir, self.pki
        b = {k: str(v) for k, v in (bins or {}).items()}

        def c(name: str, argv: list[str], env: dict[str, str] | None = None) -> Component:
            return Component(name, argv, st, env)

        ca, serving = pki.ca, pki.apiserver_serving()
        sa, kubelet_client = pki.service_account_keys(), pki.apiserver_kubelet_client()
        front_proxy = pki.front_proxy_client()
        etcd_url = f"http://127.0.0.1:{s.etcd_client_port}"
        peer_url = f"http://127.0.0.1:{s.etcd_peer_port}"
        comps = {
            "etcd": c("etcd", [
                b.get("etcd", "etcd"), "--name=localcluster", f"--data-dir={st / 'etcd'}",
                f"--listen-client-urls={etcd_url}", f"--advertise-client-urls={etcd_url}",
                f"--listen-peer-urls={peer_url}", f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=localcluster={peer_url}",
                # A throwaway test cluster: fsync latency on VM disks would dominate every write.
                "--unsafe-no-fsync",
            ]),
            "kube-apiserver": c("kube-apiserver", [
                b.get("kube-apiserver", "kube-apiserver"),
                f"--etcd-servers={etcd_url}",
                "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", f"--secure-port={s.apiserver_port}",
                f"--tls-cert-file={serving.cert}", f"--tls-private-key-file={serving.key}",
                f"--client-ca-file={ca.cert}",
                "--authorization-mode=Node,RBAC", "--enable-admission-plugins=NodeRestriction",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-account-key-file={sa.cert}", f"--service-account-signing-key-file={sa.key}",
                f"--service-cluster-ip-range={s.service_cidr}",
                # Loopback is not a valid Endpoints address; nothing in-cluster needs the
                # `kubernetes` Service's endpoints, since pods run on this host.
                "--endpoint-reconciler-type=none",
                f"--kubelet-client-certificate={kubelet_client.cert}", f"--kubelet-client-key={kubelet_client.key}",
                f"--kubelet-certificate-authority={ca.cert}",
                "--kubelet-preferred-address-types=InternalIP",
                "--allow-privileged=true",
                # The aggregation layer; without it kcm and the scheduler log errors forever.
                f"--requestheader-client-ca-file={pki.front_proxy_ca.cert}",
                "--requestheader-allowed-names=front-proxy-client",
                "--requestheader-username-headers=X-Remote-User",
                "--requestheader-group-headers=X-Remote-Group",
                "--requestheader-extra-headers-prefix=X-Remote-Extra-",
                f"--proxy-client-cert-file={front_proxy.cert}", f"--proxy-client-key-file={front_proxy.key}",
                *self._audit_flags(),
            ]),
            "kube-controller-manager": c("kube-controller-manager", [
                b.get("kube-controller-manager", "kube-controller-manager"),
                *self._delegated_auth("kube-controller-manager"),
                "--bind-address=127.0.0.1", f"--secure-port={s.controller_manager_port}",
                "--controllers=*", "--leader-elect=false",
                f"--service-account-private-key-file={sa.key}", f"--root-ca-file={ca.cert}",
                "--use-service-account-credentials",
                f"--cluster-signing-cert-file={ca.cert}", f"--cluster-signing-key-file={ca.key}",
                f"--service-cluster-ip-range={s.service_cidr}",
            ]),
            "kube-scheduler": c("kube-scheduler", [
                b.get("kube-scheduler", "kube-scheduler"),
                *self._delegated_auth("kube-scheduler"),
                "--bind-address=127.0.0.1", f"--secure-port={s.scheduler_port}", "--leader-elect=false",
            ]),
            "minio": c("minio", [
                b.get("minio", "minio"), "server", str(st / "s3"),
                f"--address=127.0.0.1:{s.s3_port}", f"--console-address=127.0.0.1:{s.s3_console_port}",
            ], env={"MINIO_ROOT_USER": s.s3_access_key, "MINIO_ROOT_PASSWORD": s.s3_secret_key,
                    "MINIO_BROWSER": "off", "MINIO_UPDATE": "off"}),
        }
        for i, node in enumerate(self._known_nodes()):
            comps[f"node-agent-{node}"] = c(f"node-agent-{node}", self._node_agent_argv(node, i))
        return comps

    def _audit_flags(self) -> list[str]:
        """Audit logging of `audit_users` only (everyone else at level None, so the log holds exactly
        the requests to count). RequestReceived is left out: each request then appears once
        (ResponseComplete) or, for a watch, once more when its response starts (ResponseStarted)."""
        if not self.settings.audit_users:
            return []
        policy = {"apiVersion": "audit.k8s.io/v1", "kind": "Policy", "omitStages": ["RequestReceived"],
                  "rules": [{"level": "Metadata", "users": list(self.settings.audit_users)}, {"level": "None"}]}
        path = self.state_dir / "audit-policy.yaml"
        path.write_text(yaml.safe_dump(policy, sort_keys=False))
        return [f"--audit-policy-file={path}", f"--audit-log-path={self.audit_log_path}",
                "--audit-log-format=json", "--audit-log-maxsize=0"]

    def _node_agent_argv(self, node: str, index: int) -> list[str]:
        s, pki = self.settings, self.pki
        serving = pki.kubelet_serving()
        return [
            sys.executable, "-m", "qlora_localcluster.nodeagent",
            f"--kubeconfig={self.state_dir / 'kubeconfigs' / f'{node}.kubeconfig'}",
            f"--node-name={node}",
            f"--gpus={s.gpus_per_node}", f"--gpu-product={s.gpu_product}", f"--max-pods={s.max_pods_per_node}",
            "--address=127.0.0.1", f"--port={s.node_agent_base_port + index}",
            f"--tls-cert-file={serving.cert}", f"--tls-private-key-file={serving.key}",
            f"--client-ca-file={pki.ca.cert}",
            f"--root-dir={self.state_dir / 'nodes' / node}",
            # A thread limit set for this host's processes (the test suite sets one: its workers
            # outnumber the cores) holds for the pods too, which run as processes on this host.
            *(["--pass-env=OMP_NUM_THREADS"] if "OMP_NUM_THREADS" in os.environ else []),
        ]

    def _delegated_auth(self, name: str) -> list[str]:
        kc = self.state_dir / "kubeconfigs" / f"{name}.kubeconfig"
        return [f"--kubeconfig={kc}", f"--authentication-kubeconfig={kc}", f"--authorization-kubeconfig={kc}"]

    def _known_nodes(self) -> list[str]:
        """The configured nodes plus any whose agent still has a pid file (from an earlier `up`)."""
        nodes = self.settings.node_names()
        for pidfile in sorted((self.state_dir / "pids").glob("node-agent-*.pid")):
            node = pidfile.stem.removeprefix("node-agent-")
            if node not in nodes:
                nodes.append(node)
        return nodes

    def _write_kubeconfigs(self) -> None:
        pki = self.pki
        _write_kubeconfig(self.kubeconfig, self.api_url, pki.ca.cert, pki.admin(), "admin")
        kdir = self.state_dir / "kubeconfigs"
        _write_kubeconfig(kdir / "kube-controller-manager.kubeconfig", self.api_url, pki.ca.cert,
                          pki.controller_manager(), "system:kube-controller-manager")
        _write_kubeconfig(kdir / "kube-scheduler.kubeconfig", self.api_url, pki.ca.cert,
                          pki.scheduler(), "system:kube-scheduler")
        for node in self.settings.node_names():
            _write_kubeconfig(kdir / f"{node}.kubeconfig", self.api_url, pki.ca.cert,
                              pki.node_client(node), f"system:node:{node}")

    def _ssl(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.pki.ca.cert))
        admin = self.pki.admin()
        ctx.load_cert_chain(str(admin.cert), str(admin.key))
        return ctx

    def api_get(self, path: str) -> dict:
        with urllib.request.urlopen(self.api_url + path, context=self._ssl(), timeout=5) as r:
            return json.load(r)

    def _api_ok(self, path: str) -> bool:
        try:
            self.api_get(path) if path.startswith("/api") else urllib.request.urlopen(
                self.api_url + path, context=self._ssl(), timeout=5).read()
            return True
        except (OSError, ValueError):
            return False

    def _node_ready(self, node: str) -> bool:
        """Ready, and schedulable: the node lifecycle controller lifts its `not-ready` and
        `unreachable` taints a monitor period after the Ready condition flips (on every restart
        of a kept etcd), and until then the scheduler reports taints, not resources."""
        try:
            obj = self.api_get(f"/api/v1/nodes/{node}")
        except (OSError, ValueError):
            return False
        conditions = obj.get("status", {}).get("conditions", [])
        taints = obj.get("spec", {}).get("taints", [])
        return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions) and not any(
            t.get("key", "").startswith("node.kubernetes.io/") for t in taints)

    def _wait(self, component: Component, pid: int, what: str, timeout: float, ready) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready():
                return
            if processes.exited(pid):
                raise ComponentFailed(
                    f"{component.name} (pid {pid}) exited before {what}; last lines of {component.log}:\n"
                    + processes.log_tail(component))
            time.sleep(0.25)
        raise ComponentFailed(f"{component.name}: no {what} after {timeout:.0f} s; last lines of "
                              f"{component.log}:\n" + processes.log_tail(component))


def _write_kubeconfig(path: Path, server: str, ca: Path, client: CertPair, user: str) -> None:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "qlora-local", "cluster": {"server": server, "certificate-authority": str(ca)}}],
        "users": [{"name": user, "user": {"client-certificate": str(client.cert), "client-key": str(client.key)}}],
        "contexts": [{"name": "qlora-local", "context": {"cluster": "qlora-local", "user": user}}],
        "current-context": "qlora-local",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=3) as r:
            return r.status == 200
    except (OSError, ValueError):
        return False


def _https_ok(url: str) -> bool:
    """Health of a component that serves a self-signed cert of its own (kcm, scheduler)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        with urllib.request.urlopen(url, context=ctx, timeout=3) as r:
            return r.status == 200
    except (OSError, ValueError):
        return False


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
