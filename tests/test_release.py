"""The release workflow's promises that hold without a registry or a container engine: one version
(pyproject's) that the chart, its default image tags and the workflow all follow, and a check that
refuses a tag or a chart that disagrees. No server.
"""

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from qlora_localcluster.build import HELM_VERSION
from support.helm import helm

REPO = Path(__file__).resolve().parents[1]
CHECK = Path(".github/scripts/release_version.py")
WORKFLOWS = REPO / ".github" / "workflows"
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


def release_check(*args: str, repo: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(repo / CHECK), *args], capture_output=True, text=True, timeout=60)


def facts(output: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in output.splitlines())


def workflow(name: str) -> dict:
    data = yaml.safe_load((WORKFLOWS / name).read_text())
    data["on"] = data.pop(True, data.get("on"))  # YAML 1.1 reads the key `on` as a boolean
    return data


def test_the_version_tag_is_checked_against_pyproject():
    accepted = release_check("--tag", f"v{VERSION}")
    assert accepted.returncode == 0, accepted.stderr
    assert facts(accepted.stdout) == {
        "version": VERSION,
        "operator_image": "ghcr.io/qlora-operator/operator",
        "trainer_image": "ghcr.io/qlora-operator/trainer",
        "chart_repository": "oci://ghcr.io/qlora-operator/charts",
        "chart_name": "qlora-operator",
    }
    refused = release_check("--tag", "v99.0.0")
    assert refused.returncode != 0 and f"expected v{VERSION}" in refused.stderr


@pytest.mark.parametrize(("path", "old", "new", "complaint"), [
    ("charts/qlora-operator/Chart.yaml", f'appVersion: "{VERSION}"', 'appVersion: "9.9.9"', "Chart.yaml appVersion"),
    ("charts/qlora-operator/Chart.yaml", f"version: {VERSION}\n", "version: 9.9.9\n", "Chart.yaml version"),
    ("charts/qlora-operator/values.yaml", 'tag: ""', 'tag: "latest"', "image.tag"),
    ("operator/qlora_operator/settings.py", f"trainer:{VERSION}", "trainer:9.9.9", "DEFAULT_TRAINER_IMAGE"),
    ("operator/qlora_cli/serving.py", f"trainer:{VERSION}", "trainer:9.9.9", "FETCH_IMAGE"),
])
def test_a_repository_that_disagrees_with_pyproject_is_refused(tmp_path, path, old, new, complaint):
    for part in ("pyproject.toml", "charts", "operator/qlora_operator/settings.py", "operator/qlora_cli/serving.py",
                 str(CHECK)):
        target = tmp_path / part
        target.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if (REPO / part).is_dir() else shutil.copy)(REPO / part, target)
    assert release_check(repo=tmp_path).returncode == 0
    edited = tmp_path / path
    assert old in edited.read_text()
    edited.write_text(edited.read_text().replace(old, new, 1))
    refused = release_check(repo=tmp_path)
    assert refused.returncode != 0 and complaint in refused.stderr


def test_the_charts_default_images_are_the_release_images():
    rendered = helm("template", "qlora", str(REPO / "charts" / "qlora-operator"), "--namespace", "qlora-system").stdout
    deployment = next(d for d in yaml.safe_load_all(rendered) if d and d["kind"] == "Deployment")
    container = next(c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "operator")
    release = facts(release_check().stdout)
    assert container["image"] == f"{release['operator_image']}:{VERSION}"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["QLORA_TRAINER_IMAGE"] == f"{release['trainer_image']}:{VERSION}"


def test_the_release_workflow_pushes_what_the_chart_pulls_at_the_checked_version():
    release = workflow("release.yml")
    assert release["on"] == {"push": {"tags": ["v*"]}}
    jobs = release["jobs"]
    check = " ".join(step.get("run", "") for step in jobs["version"]["steps"])
    assert f"python {CHECK} --tag \"$GITHUB_REF_NAME\"" in check
    for name, job in jobs.items():
        if name != "version":
            assert "version" in job["needs"], f"{name} runs before the version check"

    def build_step(job: str) -> dict:
        return next(s["with"] for s in jobs[job]["steps"] if s.get("uses", "").startswith("docker/build-push-action"))

    operator = build_step("operator-image")
    assert operator["file"] == "operator/Dockerfile" and operator["push"] is True
    assert set(operator["platforms"].split(",")) == {"linux/amd64", "linux/arm64"}
    assert operator["tags"] == "${{ needs.version.outputs.operator_image }}:${{ needs.version.outputs.version }}"
    trainer = build_step("trainer-image")
    assert trainer["file"] == "trainer_image/Dockerfile"
    assert "name=${{ needs.version.outputs.trainer_image }}" in trainer["outputs"]
    assert {i["platform"] for i in jobs["trainer-image"]["strategy"]["matrix"]["include"]} == {"linux/amd64", "linux/arm64"}
    manifest = " ".join(s.get("run", "") for s in jobs["trainer-manifest"]["steps"])
    assert 'imagetools create --tag "$IMAGE:$VERSION"' in manifest
    assert jobs["trainer-manifest"]["steps"][-1]["env"]["IMAGE"] == "${{ needs.version.outputs.trainer_image }}"
    chart = jobs["chart"]
    assert {"operator-image", "trainer-manifest"} <= set(chart["needs"])  # the chart only after its images
    setup_helm = next(s for s in chart["steps"] if s.get("uses", "").startswith("azure/setup-helm"))
    assert setup_helm["with"]["version"] == HELM_VERSION
    push = " ".join(s.get("run", "") for s in chart["steps"])
    assert 'helm push "dist/$CHART_NAME-$VERSION.tgz" "$CHART_REPOSITORY"' in push


def test_ci_runs_the_test_suite_and_the_image_on_both_platforms():
    jobs = workflow("ci.yml")["jobs"]
    assert any(".ci/run" in s.get("run", "") for s in jobs["test"]["steps"])
    build = next(s["with"] for s in jobs["operator-image"]["steps"] if s.get("uses", "").startswith("docker/build-push-action"))
    assert build["file"] == "operator/Dockerfile" and build["platforms"] == "linux/amd64,linux/arm64"
