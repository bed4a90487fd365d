"""The operator image without a container engine: operator/Dockerfile's own install steps, run in a
fresh virtualenv from the files its COPY lines name, then its entrypoint against the local cluster.

The test walks the Dockerfile's build stage (WORKDIR, COPY, RUN of operator/image/install.sh) instead
of repeating it, so the image and this test cannot drift apart. What it cannot check here: the base
images themselves and the multi-arch build (the release workflow does those; see
tests/test_image_build.py for a real build from Debian packages with buildah).

    .venv/bin/pytest tests/test_operator_image.py     # ~40 s, most of it pip
"""

import json
import os
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from support.operator_image import assert_it_reconciles, wait_healthy
from support.operator_process import free_port, install_crd_and_rbac, service_account_kubeconfig

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "operator" / "Dockerfile"
IMAGE_DIR = REPO / "operator" / "image"


def instructions(dockerfile: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    logical, current = [], ""
    for line in dockerfile.read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        current += line.rstrip("\\").strip() + " "
        if not line.endswith("\\"):
            logical.append(current.strip())
            current = ""
    return [(first.upper(), rest) for first, _, rest in (i.partition(" ") for i in logical)]


def build_stage() -> list[tuple[str, str]]:
    """The instructions of the stage that installs the virtualenv (`FROM ... AS build`)."""
    steps = instructions()
    start = next(i for i, (op, args) in enumerate(steps) if op == "FROM" and args.endswith(" AS build"))
    end = next(i for i in range(start + 1, len(steps)) if steps[i][0] == "FROM")
    return steps[start + 1:end]


def pins(path: Path) -> dict[str, str]:
    lines = [line for line in path.read_text().splitlines() if line and not line.startswith("#")]
    return {canonicalize_name(n): v for n, _, v in (line.partition("==") for line in lines)}


def test_the_dockerfile_installs_with_its_own_script_and_runs_as_the_charts_user():
    steps = instructions()
    runs = [args for op, args in build_stage() if op == "RUN" and "operator/image/install.sh" in args]
    assert runs == ["operator/image/install.sh deps /opt/venv", "operator/image/install.sh project /opt/venv"]
    final = steps[max(i for i, (op, _) in enumerate(steps) if op == "FROM"):]
    assert ("COPY", "--from=build /opt/venv /opt/venv") in final  # only the virtualenv crosses over
    values = yaml.safe_load((REPO / "charts/qlora-operator/values.yaml").read_text())
    user = next(args for op, args in final if op == "USER")
    assert user == f"{values['podSecurityContext']['runAsUser']}:{values['podSecurityContext']['runAsUser']}"
    assert values["securityContext"]["readOnlyRootFilesystem"] is True
    env = next(args for op, args in final if op == "ENV")
    assert "HOME=/tmp" in env and "TMPDIR=/tmp" in env  # the chart's only writable mount
    assert next(args for op, args in final if op == "ENTRYPOINT") == '["/opt/venv/bin/qlora-operator"]'


def test_the_dockerignore_admits_exactly_what_the_dockerfile_copies():
    ignore = (REPO / "operator" / "Dockerfile.dockerignore").read_text().splitlines()
    admitted = sorted(line[1:].removesuffix("/**") for line in ignore if line.startswith("!"))
    # COPY a b dir/ names files; the ignore file lists each, or a folder as folder/**.
    copied = sorted(src.rstrip("/") for op, args in build_stage() if op == "COPY"
                    for src in args.split()[:-1])
    assert copied == admitted
    rules = [line for line in ignore if line and not line.startswith("#")]
    assert rules[0] == "**" and rules[-1] == "**/__pycache__"  # everything else stays out


def test_the_pins_meet_pyprojects_requirements_and_include_no_trainer_packages():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    runtime, build = pins(IMAGE_DIR / "constraints.txt"), pins(IMAGE_DIR / "build-constraints.txt")
    for spec, pinned in [(project["project"]["dependencies"] + project["project"]["optional-dependencies"]["operator"],
                          runtime), (project["build-system"]["requires"], build)]:
        for requirement in map(Requirement, spec):
            name = canonicalize_name(requirement.name)
            assert name in pinned, f"{name} is required by pyproject but not pinned"
            assert requirement.specifier.contains(pinned[name]), f"{name}=={pinned[name]} is not {requirement}"
    assert not {"torch", "transformers", "boto3", "setuptools"} & set(runtime)


@pytest.fixture(scope="module")
def image_venv(tmp_path_factory) -> Path:
    """The build stage replayed on this machine: files copied as its COPY lines say (under the
    Dockerfile's WORKDIR, here a temporary folder), install.sh run as its RUN lines say, with the
    virtualenv in a temporary folder instead of /opt/venv."""
    root = tmp_path_factory.mktemp("image")
    context, venv = root / "src", root / "venv"
    context.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PIP_CONSTRAINT")}
    env["PYTHON"] = sys._base_executable
    for op, args in build_stage():
        if op == "COPY":
            *sources, dest = args.split()
            for source in sources:  # COPY's rules: a folder's contents into dest, a file into dest/
                src, target = REPO / source, context / dest
                if src.is_dir():
                    shutil.copytree(src, target, ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True)
                else:
                    target = target / src.name if dest.endswith("/") else target
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(src, target)
        elif op == "RUN" and "operator/image/install.sh" in args:
            argv = [a.replace("/opt/venv", str(venv)) for a in shlex.split(args)]
            result = subprocess.run(argv, cwd=context, env=env, capture_output=True, text=True, timeout=600)
            assert result.returncode == 0, f"{args} failed:\n{result.stdout}\n{result.stderr}"
    return venv


def test_the_image_environment_holds_the_pins_and_the_operator_and_nothing_else(image_venv):
    listing = subprocess.run([image_venv / "bin/python", "-c", "import importlib.metadata as m, json; "
                              "print(json.dumps({d.name: d.version for d in m.distributions()}))"],
                             capture_output=True, text=True, check=True)
    installed = {canonicalize_name(n): v for n, v in json.loads(listing.stdout).items()}
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    # No pip or setuptools either: the image runs no installer.
    assert installed == pins(IMAGE_DIR / "constraints.txt") | {"qlora-operator": version}
    # The wheel holds the API models and the operator only: the trainer and the local cluster
    # were not in the build context.
    probe = subprocess.run([image_venv / "bin/python", "-c",
                            "import importlib.util as u; print([m for m in ('qlora_api', 'qlora_operator', "
                            "'qlora_trainer', 'qlora_localcluster', 'torch') if u.find_spec(m)])"],
                           capture_output=True, text=True, check=True, env={"PATH": "/usr/bin:/bin"}, cwd="/")
    assert probe.stdout.strip() == "['qlora_api', 'qlora_operator']"


@pytest.mark.cluster
def test_the_entrypoint_reconciles_a_job_on_the_local_cluster(image_venv, local_cluster, namespace, tmp_path):
    """The image's entrypoint, from the fresh virtualenv alone (no PYTHONPATH, nothing of this
    checkout), authenticated as the chart's ServiceAccount."""
    install_crd_and_rbac(local_cluster)
    kubeconfig = service_account_kubeconfig(local_cluster, tmp_path / "kubeconfig")
    health, log = free_port(), tmp_path / "operator.log"
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "KUBECONFIG": str(kubeconfig),
           "QLORA_HEALTH_PORT": str(health), "QLORA_METRICS_PORT": "0", "QLORA_RECONCILE_INTERVAL_SECONDS": "1"}
    with open(log, "wb") as out:
        proc = subprocess.Popen([image_venv / "bin/qlora-operator", "--namespace", namespace],
                                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    try:
        wait_healthy(proc, health, log)
        job = assert_it_reconciles(local_cluster, namespace, log)
        # The trainer pod's securityContext, as rendered by the installed operator and stored by the API server.
        assert job["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == 10001
    finally:
        proc.terminate()
        proc.wait(30)
