"""The previous release's chart, as platform teams have it installed (tests/previous_release/)."""

from pathlib import Path

import yaml

from support.helm import helm

CHART = Path(__file__).resolve().parents[1] / "previous_release" / "qlora-operator-0.1.0.tgz"


def app_version(chart: Path = CHART) -> str:
    """The operator image tag the release runs by default."""
    return str(yaml.safe_load(helm("show", "chart", str(chart)).stdout)["appVersion"])


def rendered_crd(chart: Path = CHART) -> dict:
    """The QLoRAJob CRD exactly as `helm install` of `chart` creates it (default values)."""
    out = helm("template", "previous", str(chart), "--show-only", "templates/crd-qlorajobs.yaml").stdout
    return yaml.safe_load(out)
