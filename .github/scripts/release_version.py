"""The release's version and image names, from one place: pyproject.toml's [project] version.

    python .github/scripts/release_version.py                     # the repository agrees with itself
    python .github/scripts/release_version.py --tag v0.2.0        # ... and with the tag being released
    python .github/scripts/release_version.py --tag "$GITHUB_REF_NAME" --github-output "$GITHUB_OUTPUT"

Everything else that names the version must agree with pyproject: the chart's version and
appVersion, the chart's default image tags (empty, so they resolve to appVersion), and the
operator's built-in default trainer image. The image repositories come from the chart's
values.yaml, so what the workflow pushes is what `helm install` pulls. Needs PyYAML only.
"""

import argparse
import ast
import re
import sys
import tomllib
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "qlora-operator"
SETTINGS = REPO / "operator" / "qlora_operator" / "settings.py"
SERVING = REPO / "operator" / "qlora_cli" / "serving.py"
# Helm needs SemVer 2 and pip PEP 440: plain X.Y.Z is the form both read the same way.
PLAIN_VERSION = re.compile(r"^\d+\.\d+\.\d+$")


def module_constant(path: Path, name: str) -> str:
    tree = ast.parse(path.read_text())
    return next(node.value.value for node in tree.body if isinstance(node, ast.Assign)
                and any(getattr(t, "id", None) == name for t in node.targets))


def default_trainer_image() -> str:
    return module_constant(SETTINGS, "DEFAULT_TRAINER_IMAGE")


def release_facts(tag: str | None = None) -> dict[str, str]:
    """The version and names to release, or SystemExit with every disagreement found."""
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    operator_image, trainer_image = values["image"], values["trainerImage"]
    problems = []
    if not PLAIN_VERSION.match(version):
        problems.append(f"pyproject version {version!r} is not X.Y.Z")
    for key in ("version", "appVersion"):
        if chart.get(key) != version:
            problems.append(f"Chart.yaml {key} is {chart.get(key)!r}, pyproject says {version!r}")
    for name, image in (("image", operator_image), ("trainerImage", trainer_image)):
        if image.get("tag") not in ("", None):
            problems.append(f"values.yaml {name}.tag is {image['tag']!r}: leave it empty so it follows appVersion")
    if not default_trainer_image().endswith(f":{version}"):
        problems.append(f"settings.DEFAULT_TRAINER_IMAGE {default_trainer_image()!r} is not tagged {version}")
    # `qlora serve`'s init container runs the trainer image of the CLI's own release.
    if not (fetch_image := module_constant(SERVING, "FETCH_IMAGE")).endswith(f":{version}"):
        problems.append(f"qlora_cli.serving.FETCH_IMAGE {fetch_image!r} is not tagged {version}")
    if tag is not None and tag != f"v{version}":
        problems.append(f"tag {tag!r} does not match the version in pyproject.toml (expected v{version})")
    if problems:
        raise SystemExit("release version check failed:\n  " + "\n  ".join(problems))
    registry_org = operator_image["repository"].rsplit("/", 1)[0]
    return {
        "version": version,
        "operator_image": operator_image["repository"],
        "trainer_image": trainer_image["repository"],
        "chart_repository": f"oci://{registry_org}/charts",
        "chart_name": chart["name"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="Check and print the release's version and image names.")
    parser.add_argument("--tag", help="the git tag being released, e.g. v0.2.0")
    parser.add_argument("--github-output", type=Path, help="append key=value lines here ($GITHUB_OUTPUT)")
    args = parser.parse_args()
    lines = [f"{key}={value}" for key, value in release_facts(args.tag).items()]
    if args.github_output:
        with args.github_output.open("a") as out:
            out.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
