"""`python -m qlora_localcluster {build,up,down,status,kubeconfig,env}`."""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from . import build, kueue
from .cluster import ClusterSettings, ComponentFailed, LocalCluster, default_state_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qlora-localcluster", description=__doc__)
    parser.add_argument("--state-dir", default=None,
                        help=f"certificates, data, logs, pids (default $QLORA_CLUSTER_DIR or {default_state_dir()})")
    sub = parser.add_subparsers(dest="command", required=True)
    build_cmd = sub.add_parser("build", help="build the binaries into the cache (once per version)")
    build_cmd.add_argument("--test-tools", action="store_true",
                           help="also what only the tests use (Kueue, the kstatus checker)")
    up = sub.add_parser("up", help="start the cluster and wait until it is ready (idempotent)")
    up.add_argument("--gpu-nodes", type=int, help="number of GPU nodes (default 1)")
    up.add_argument("--gpus-per-node", type=int, help="nvidia.com/gpu each node advertises (default 1)")
    up.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for each component")
    up.add_argument("--kueue", action="store_true",
                    help="also install and start Kueue (job queueing; built from its Go module)")
    for field in ClusterSettings.__dataclass_fields__:
        if field.endswith("_port"):
            up.add_argument(f"--{field.replace('_', '-')}", type=int, dest=field,
                            help=f"default {getattr(ClusterSettings(), field)}")
    sub.add_parser("down", help="stop every component (the apiserver takes ~15-20 s)")
    sub.add_parser("status", help="pid and health of each component")
    sub.add_parser("kubeconfig", help="print the admin kubeconfig's path")
    sub.add_parser("env", help="print shell exports: eval \"$(python -m qlora_localcluster env)\"")
    args = parser.parse_args(argv)

    if args.command == "build":
        build.main(test_tools=args.test_tools)
        return 0
    overrides = {}
    if args.command == "up":
        overrides = {k: v for k, v in vars(args).items()
                     if k in ClusterSettings.__dataclass_fields__ and v is not None}
    cluster = LocalCluster(args.state_dir, **overrides)
    if args.command == "up":
        try:
            cluster.up(timeout=args.timeout)
            if args.kueue:
                kueue.ensure_running(cluster)
        except (ComponentFailed, RuntimeError) as failure:
            print(f"error: {failure}", file=sys.stderr)
            return 1
        print(f"export KUBECONFIG={shlex.quote(str(cluster.kubeconfig))}")
    elif args.command == "down":
        cluster.down()
    elif args.command == "status":
        healthy = True
        for name, (pid, health) in cluster.status().items():
            print(f"{name:32} {pid or '-':>8}  {health}")
            healthy &= health == "healthy"
        return 0 if healthy else 3
    elif args.command == "kubeconfig":
        print(cluster.kubeconfig)
    elif args.command == "env":
        for key, value in cluster.env().items():
            if key == "PATH":  # prepend, and let the shell expand its own $PATH
                value = os.pathsep.join(shlex.quote(d) for d in cluster.tool_dirs())
                print(f'export PATH={value}:"$PATH"')
            else:
                print(f"export {key}={shlex.quote(value)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
