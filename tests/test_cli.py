"""`qlora` against the local cluster with a real operator and the scripted trainer: submit (and
the API server's refusals with their field paths), watch until success or failure, list,
describe, logs, and the same binary as a kubectl plugin.

    .venv/bin/pytest tests/test_cli.py
"""

import json
import os
import stat
import subprocess
import sys
import tomllib

import pytest
import yaml
from qlora_localcluster import build
from qlora_localcluster.testing import kubectl
from support.cli import REPO, qlora
from support.operator_process import (
    FAKE_TRAINER_IMAGE,
    OperatorProcess,
    install_crd_and_rbac,
    service_account_kubeconfig,
)
from support.shared_gpu import wait_for_the_gpu

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def operator_kubeconfig(local_cluster, tmp_path_factory):
    install_crd_and_rbac(local_cluster)
    return service_account_kubeconfig(local_cluster, tmp_path_factory.mktemp("operator") / "kubeconfig")


@pytest.fixture
def operator(local_cluster, namespace, operator_kubeconfig, tmp_path):
    wait_for_the_gpu(local_cluster)
    kubectl(local_cluster, "-n", namespace, "create", "secret", "generic", "s3",
            "--from-literal=AWS_ACCESS_KEY_ID=test", "--from-literal=AWS_SECRET_ACCESS_KEY=test-secret")
    process = OperatorProcess(operator_kubeconfig, namespace, tmp_path / "operator.log").start()
    yield process
    kubectl(local_cluster, "-n", namespace, "delete", "qlorajobs", "--all", "--wait=false", check=False)
    process.stop()


def submit_args(name, scenario="succeed", steps=10):
    return ["submit", name, "--model", f"hf://fake/{scenario}", "--dataset", "s3://datasets/chat/train.jsonl",
            "--bucket", "adapters", "--secret", "s3", "--max-steps", str(steps), "--rank", "8",
            "--image", FAKE_TRAINER_IMAGE]


def test_dry_run_prints_the_qlorajob_without_a_server(tmp_path):
    # No cluster: the kubeconfig does not even exist.
    out = subprocess.run([sys.executable, "-m", "qlora_cli", "--kubeconfig", str(tmp_path / "none"),
                          *submit_args("dry"), "-n", "team-a", "--dry-run"],
                         capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.returncode == 0, out.stderr
    manifest = yaml.safe_load(out.stdout)
    assert manifest["kind"] == "QLoRAJob" and manifest["metadata"] == {"name": "dry", "namespace": "team-a"}
    assert manifest["spec"]["lora"] == {"r": 8} and manifest["spec"]["training"] == {"maxSteps": 10}


def test_the_api_servers_refusal_names_each_field(local_cluster, namespace, tmp_path):
    install_crd_and_rbac(local_cluster)
    args = submit_args("bad") + ["--rank", "0", "--bucket", "Not_A_Bucket", "--set", "lora.dropout=1.5"]
    out = qlora(local_cluster, "-n", namespace, *args)
    assert out.returncode == 1, out.stdout
    assert "the API server refused QLoRAJob bad" in out.stderr
    for field in ("spec.lora.r", "spec.output.bucket", "spec.lora.dropout"):
        assert f"  {field}: " in out.stderr, out.stderr
    assert kubectl(local_cluster, "-n", namespace, "get", "qlorajobs", "-o", "name").stdout.strip() == ""

    server = qlora(local_cluster, "-n", namespace, *submit_args("defaults"), "--dry-run=server")
    assert server.returncode == 0, server.stderr
    defaulted = yaml.safe_load(server.stdout)["spec"]  # the API server's defaults, nothing stored
    assert defaulted["lora"] == {"r": 8, "alpha": 32, "dropout": 0.05, "targetModules": ["all-linear"], "bias": "none"}
    assert kubectl(local_cluster, "-n", namespace, "get", "qlorajobs", "-o", "name").stdout.strip() == ""

    # A file, with flags on top: its name and fields stay unless a flag says otherwise.
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({"kind": "QLoRAJob", "metadata": {"name": "from-file"}, "spec": {
        "model": {"uri": "hf://fake/succeed"}, "dataset": {"uri": "s3://data/x.jsonl"}, "output": {"bucket": "out"},
        "lora": {"r": 4, "alpha": 8}}}))
    server = qlora(local_cluster, "-n", namespace, "submit", "-f", str(path), "--rank", "16", "--dry-run=server")
    assert server.returncode == 0, server.stderr
    stored = yaml.safe_load(server.stdout)
    assert stored["metadata"]["name"] == "from-file" and stored["metadata"]["namespace"] == namespace
    assert (stored["spec"]["lora"]["r"], stored["spec"]["lora"]["alpha"]) == (16, 8)


def test_submit_and_watch_to_success_then_list_describe_and_logs(local_cluster, namespace, operator):
    out = qlora(local_cluster, "-n", namespace, *submit_args("happy"), "--watch", timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr + operator.log_tail()
    lines = out.stdout.splitlines()
    assert lines[0] == f"qlorajob/happy created in namespace {namespace}"
    # Not a terminal: one line per change, each a bar with step of total and the condition.
    bars = [line for line in lines if "█" in line or "░" in line]
    assert any("/10" in line and "loss " in line and "Running (Training)" in line for line in bars), out.stdout
    assert "10/10 100%" in bars[-1]
    job = json.loads(kubectl(local_cluster, "-n", namespace, "get", "qlj", "happy", "-o", "json").stdout)
    assert "Succeeded: happy" in lines and f"  adapter    {job['status']['result']['adapterUri']}" in lines

    listed = qlora(local_cluster, "-n", namespace, "list")
    header, row = listed.stdout.splitlines()
    assert header.split()[:4] == ["NAME", "PHASE", "PROGRESS", "LOSS"]
    assert row.split()[:5] == ["happy", "Succeeded", "10/10", "(100%)", "0.3"]

    described = qlora(local_cluster, "-n", namespace, "describe", "happy").stdout
    assert "Phase:       Succeeded, attempt 1 of 3 (Job happy-1)" in described
    assert "the adapter is published (Succeeded" in described
    assert "the operator accepted the spec (Accepted" in described
    assert "JobCreated" in described.split("Events:")[1]

    logs = qlora(local_cluster, "-n", namespace, "logs", "happy")
    assert logs.returncode == 0, logs.stderr
    assert "scenario succeed" in logs.stdout and '"step":10' in logs.stdout


def test_watch_ends_non_zero_with_the_reason_and_a_hint(local_cluster, namespace, operator):
    assert qlora(local_cluster, "-n", namespace, *submit_args("broken", "bad-data")).returncode == 0
    out = qlora(local_cluster, "-n", namespace, "watch", "broken", "--timeout", "90", timeout=120)
    assert out.returncode == 1, out.stdout + out.stderr
    tail = out.stdout.splitlines()[-3:]
    assert tail[0] == "Failed: broken: BadData"
    assert "line 3: a record without 'messages'" in tail[1]
    assert tail[2].startswith("  hint: fix the record")
    described = qlora(local_cluster, "-n", namespace, "describe", "broken").stdout
    assert "the job failed (BadData" in described and "Hint:" in described


def test_watch_of_a_missing_job_and_a_timeout(local_cluster, namespace):
    install_crd_and_rbac(local_cluster)
    missing = qlora(local_cluster, "-n", namespace, "watch", "nope")
    assert missing.returncode == 1 and f"QLoRAJob 'nope' not found in namespace '{namespace}'" in missing.stderr
    # No operator watches this namespace: the job stays Pending and watch gives up with 124.
    assert qlora(local_cluster, "-n", namespace, *submit_args("idle")).returncode == 0
    out = qlora(local_cluster, "-n", namespace, "watch", "idle", "--timeout", "2", "--interval", "0.5")
    assert out.returncode == 124 and "still Pending after 2 s" in out.stderr


def test_kubectl_runs_it_as_a_plugin(local_cluster, namespace, tmp_path):
    """kubectl finds `kubectl-qlora` on PATH; pyproject installs the same entry point under that name."""
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["kubectl-qlora"] == scripts["qlora"] == "qlora_cli.main:main"
    shim = tmp_path / "kubectl-qlora"  # what pip writes for that entry point
    shim.write_text(f"#!{sys.executable}\nimport sys\nfrom qlora_cli.main import main\nsys.exit(main())\n")
    shim.chmod(shim.stat().st_mode | stat.S_IEXEC)
    install_crd_and_rbac(local_cluster)
    kubectl(local_cluster, "-n", namespace, "apply", "-f", "-", input=yaml.safe_dump(yaml.safe_load(
        qlora(local_cluster, *submit_args("viaplugin"), "-n", namespace, "--dry-run").stdout)))
    kubectl_bin = str(build.ensure_binaries(["kubectl"])["kubectl"])
    env = {**os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}", "KUBECONFIG": str(local_cluster.kubeconfig)}
    out = subprocess.run([kubectl_bin, "qlora", "list", "-n", namespace], capture_output=True, text=True, env=env,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[1].split()[:2] == ["viaplugin", "Pending"]
