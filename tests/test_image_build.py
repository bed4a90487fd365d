"""operator/Dockerfile built on this machine (no container engine, no registry) and run once.

buildah builds the Dockerfile unchanged against stand-ins for its two bases made from Debian
packages (tests/support/image_build.py); the built image's root filesystem then runs the operator
as the chart's pod would: the image's user, a read-only root, /tmp as the only writable path, and
in-cluster credentials for the chart's ServiceAccount. Needs root, buildah and mmdebstrap (.ci/run
installs them); skipped elsewhere unless QLORA_REQUIRE_IMAGE_BUILD=1, which CI sets.

    .venv/bin/pytest tests/test_image_build.py     # ~3-6 min: the build, mostly vfs copying layers
"""

import os
import shutil
import tomllib
from pathlib import Path

import pytest
from qlora_localcluster import operator_install
from qlora_localcluster.testing import kubectl
from support import image_build
from support.operator_image import assert_it_reconciles, wait_healthy
from support.operator_process import free_port, install_crd_and_rbac

REPO = Path(__file__).resolve().parents[1]
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
TAG = f"localhost/qlora-operator:{VERSION}"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    problems = image_build.missing_tools() + ([] if os.geteuid() == 0 else ["root"])
    if problems:
        message = f"building the image here needs {', '.join(problems)}"
        if os.environ.get("QLORA_REQUIRE_IMAGE_BUILD") == "1":
            pytest.fail(message)
        pytest.skip(message)
    work = tmp_path_factory.mktemp("buildah")
    try:
        buildah = image_build.build_operator_image(REPO, work, TAG)
        with buildah.rootfs(TAG) as rootfs:
            yield buildah.config(TAG), rootfs
    finally:
        shutil.rmtree(work, ignore_errors=True)  # vfs storage: a full copy of every layer


def test_the_built_image_holds_the_operator_and_no_shell_or_installer(built):
    config, rootfs = built
    assert config["User"] == "65532:65532"
    assert config["Entrypoint"] == ["/opt/venv/bin/qlora-operator"]
    site = next((rootfs / "opt/venv/lib").glob("python3*/site-packages"))
    assert (site / "qlora_operator").is_dir() and (site / "qlora_api").is_dir()
    assert not [p.name for p in site.iterdir() if p.name.startswith(("torch", "qlora_trainer", "pip", "setuptools"))]
    assert not (rootfs / "bin/sh").exists() and not (rootfs / "usr/bin/apt-get").exists()
    size, total = (sum(f.stat().st_size for f in root.rglob("*") if f.is_file() and not f.is_symlink())
                   for root in (rootfs / "opt/venv", rootfs))
    print(f"operator image: {total / 2**20:.0f} MiB unpacked, of which the virtualenv {size / 2**20:.0f} MiB")
    assert size < 120 * 2**20, f"the operator's virtualenv is {size / 2**20:.0f} MiB"


def test_the_charts_helm_test_finds_python_and_the_kubernetes_client_in_the_image(built, tmp_path):
    """The chart's `helm test` pod runs `command: [python, check_release.py]` in this image."""
    config, rootfs = built
    log = tmp_path / "python.log"
    proc = image_build.run_rootfs(rootfs, config, ["-c", "import sys, kubernetes.client, kubernetes.config; "
                                                   "print(sys.executable)"], {}, {}, log, command=["python"])
    assert proc.wait(60) == 0, log.read_text(errors="replace")
    assert log.read_text().strip() == "/opt/venv/bin/python"


@pytest.mark.cluster
def test_the_built_image_reconciles_a_job_on_the_local_cluster(built, local_cluster, namespace, tmp_path):
    config, rootfs = built
    install_crd_and_rbac(local_cluster)
    token = kubectl(local_cluster, "create", "token", operator_install.SERVICE_ACCOUNT,
                    "-n", operator_install.NAMESPACE, "--duration=1h").stdout.strip()
    service_account = {"token": token.encode(), "ca.crt": local_cluster.pki.ca.cert.read_bytes(),
                       "namespace": operator_install.NAMESPACE.encode()}
    health, log = free_port(), tmp_path / "operator.log"
    env = {"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": str(local_cluster.settings.apiserver_port),
           "HOSTNAME": "operator-from-image", "QLORA_HEALTH_PORT": str(health), "QLORA_METRICS_PORT": "0",
           "QLORA_RECONCILE_INTERVAL_SECONDS": "1"}
    proc = image_build.run_rootfs(rootfs, config, ["--namespace", namespace], env, service_account, log)
    try:
        wait_healthy(proc, health, log)
        assert_it_reconciles(local_cluster, namespace, log)
    finally:
        proc.terminate()
        proc.wait(30)
    assert "Read-only file system" not in log.read_text(errors="replace")
