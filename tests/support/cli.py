"""Running `qlora` as a user runs it: a subprocess with a kubeconfig, its output as text."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def qlora(cluster, *args: str, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess[str]:
    """`qlora --kubeconfig <the cluster's admin kubeconfig> ARGS`; the S3 settings of the user's
    environment are left out unless `env` gives them, as on a laptop with no AWS configuration."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "KUBECONFIG", "QLORA_"))}
    base.update(env or {})
    return subprocess.run([sys.executable, "-m", "qlora_cli", "--kubeconfig", str(cluster.kubeconfig), *args],
                          capture_output=True, text=True, timeout=timeout, env=base, cwd=REPO)


def s3_env(cluster) -> dict[str, str]:
    creds = cluster.s3_credentials
    return {"AWS_ACCESS_KEY_ID": creds["aws_access_key_id"], "AWS_SECRET_ACCESS_KEY": creds["aws_secret_access_key"]}
