"""`python -m qlora_localcluster.nodeagent`: run one node. SIGTERM/SIGINT stop it cleanly."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

from .image_table import ImageTable
from .kube_api import Credentials, KubeApi
from .log_server import LogServer
from .node import NodeConfig, NodeHeartbeat
from .pod_run import RuntimeConfig
from .pods import ApiResourceReader, PodController
from .process_runtime import ProcessProvider

log = logging.getLogger("qlora_localcluster.nodeagent")

SHUTDOWN_GRACE_CAP = 10.0  # seconds each pod gets on agent stop; `down` waits 20 s for the agent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m qlora_localcluster.nodeagent",
        description="Register a Node and run its pods' containers as local processes.",
    )
    api = p.add_argument_group("API server (either --kubeconfig or --server with certificates)")
    api.add_argument("--kubeconfig", help="kubeconfig with this node's identity (CN=system:node:<name>)")
    api.add_argument("--server", help="API server URL, e.g. https://127.0.0.1:16443")
    api.add_argument("--certificate-authority", help="CA that signed the API server's certificate")
    api.add_argument("--client-certificate", help="node client certificate")
    api.add_argument("--client-key", help="node client key")
    node = p.add_argument_group("the node")
    node.add_argument("--node-name", required=True, help="Node name; one agent process per node")
    node.add_argument("--gpus", type=int, default=0, help="nvidia.com/gpu capacity (default 0)")
    node.add_argument("--gpu-product", default="NVIDIA-H100-80GB-HBM3", help="label nvidia.com/gpu.product")
    node.add_argument("--gpu-memory", type=int, default=81559, help="label nvidia.com/gpu.memory, MiB")
    node.add_argument("--cpu", default=str(os.cpu_count() or 1), help="cpu capacity (default: host cores)")
    node.add_argument("--memory", default=None, help="memory capacity, a quantity (default: host RAM)")
    node.add_argument("--max-pods", type=int, default=110, help="pods capacity")
    node.add_argument(
        "--node-labels", default="", help="extra labels k=v,k2=v2 (NodeRestriction rules apply)"
    )
    node.add_argument("--lease-duration", type=int, default=40, help="Lease duration, s (renewed every 1/4)")
    node.add_argument("--status-interval", type=float, default=20.0, help="node status refresh, s")
    srv = p.add_argument_group("the kubelet endpoint (logs)")
    srv.add_argument("--address", default="127.0.0.1", help="HTTPS bind address")
    srv.add_argument("--port", type=int, default=10250, help="HTTPS port, advertised as the kubelet endpoint")
    srv.add_argument("--tls-cert-file", required=True, help="serving certificate (SAN 127.0.0.1)")
    srv.add_argument("--tls-private-key-file", required=True, help="serving key")
    srv.add_argument("--client-ca-file", help="verify the API server's client certificate against this CA")
    run = p.add_argument_group("running pods")
    run.add_argument(
        "--root-dir",
        "--state-dir",
        dest="root_dir",
        default=None,
        help="state: pods/<uid>/{volumes,containers,logs} (default .localcluster/nodes/<node>)",
    )
    run.add_argument(
        "--pass-env",
        action="append",
        default=[],
        metavar="NAME",
        help="also give containers this variable of the agent's environment (repeatable)",
    )
    run.add_argument("--image-table", help="JSON/YAML file with extra image entries (see image_table.py)")
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    if not args.kubeconfig and not (args.server and args.client_certificate and args.client_key):
        p.error("give --kubeconfig, or --server with --client-certificate and --client-key")
    return args


def credentials(args: argparse.Namespace) -> Credentials:
    if args.kubeconfig:
        return Credentials.from_kubeconfig(args.kubeconfig)
    return Credentials(
        args.server.rstrip("/"), args.certificate_authority, args.client_certificate, args.client_key
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    api = KubeApi(credentials(args))
    root = Path(args.root_dir or Path(".localcluster") / "nodes" / args.node_name).resolve()
    root.mkdir(parents=True, exist_ok=True)
    labels = dict(kv.split("=", 1) for kv in args.node_labels.split(",") if kv)
    cfg = NodeConfig(
        name=args.node_name,
        port=args.port,
        gpus=args.gpus,
        gpu_product=args.gpu_product,
        gpu_memory_mib=args.gpu_memory,
        cpu=args.cpu,
        max_pods=args.max_pods,
        extra_labels=labels,
        lease_seconds=args.lease_duration,
        status_interval=args.status_interval,
    )
    if args.memory:
        cfg.memory = args.memory

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())

    controller: PodController | None = None
    config = RuntimeConfig(
        ImageTable.with_file(args.image_table), ApiResourceReader(api), args.pass_env, api.creds.server
    )
    provider = ProcessProvider(root, config, notify=lambda uid: controller and controller.mark_dirty(uid))
    controller = PodController(api, args.node_name, provider)
    server = LogServer(
        args.address, args.port, provider, args.tls_cert_file, args.tls_private_key_file, args.client_ca_file
    )
    server.serve_in_thread()

    heartbeat = NodeHeartbeat(api, cfg)
    while not stop.is_set():
        try:
            heartbeat.register()
            break
        except Exception as e:  # the API server may still be starting
            log.warning("registering node %s: %s; retrying", args.node_name, e)
            stop.wait(2)
    if stop.is_set():
        return 0
    log.info(
        "node %s Ready; kubelet endpoint https://%s:%d; state in %s",
        args.node_name,
        args.address,
        args.port,
        root,
    )
    for target, name in (
        (heartbeat.run_forever, "heartbeat"),
        (controller.watch_forever, "pod-watch"),
        (controller.push_forever, "status-push"),
    ):
        threading.Thread(target=target, name=name, daemon=True).start()

    stop.wait()
    log.info("stopping: terminating pods, marking node NotReady")
    started = time.monotonic()
    controller.shutdown(SHUTDOWN_GRACE_CAP)
    heartbeat.stop()
    server.shutdown()
    log.info("stopped in %.1f s", time.monotonic() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
