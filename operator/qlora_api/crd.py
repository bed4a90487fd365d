"""Generates the QLoRAJob CustomResourceDefinition from the API models.

`python -m qlora_api.crd` rewrites crds/ and the Helm chart's copy; `--check` exits non-zero
when either differs from what the models generate (tests run it too).
"""

import argparse
import copy
import sys
from pathlib import Path

import yaml

from qlora_api.meta import CATEGORIES, GROUP, KIND, PLURAL, SHORT_NAMES, SINGULAR, VERSION
from qlora_api.spec import QLoRAJobSpec
from qlora_api.status import QLoRAJobStatus

REPO_ROOT = Path(__file__).resolve().parents[2]
CRD_FILE = f"{GROUP}_{PLURAL}.yaml"
CRD_PATH = REPO_ROOT / "crds" / CRD_FILE
# The chart installs the CRD from a template so that `helm upgrade` updates it too (files in a
# chart's crds/ folder are installed once and never upgraded) and so that crds.install/crds.keep
# can switch it; the template is the same document wrapped in those switches.
CHART_CRD_PATH = REPO_ROOT / "charts" / "qlora-operator" / "templates" / "crd-qlorajobs.yaml"

# JSON Schema keywords that a Kubernetes structural schema accepts as they are.
_KEPT = {
    "type", "description", "default", "enum", "format", "pattern", "minimum", "maximum",
    "minLength", "maxLength", "minItems", "maxItems", "required", "nullable",
}

PRINTER_COLUMNS = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Model", "type": "string", "jsonPath": ".spec.model.uri", "priority": 0},
    {"name": "Progress", "type": "string", "jsonPath": ".status.progress.summary"},
    {"name": "Loss", "type": "number", "jsonPath": ".status.progress.loss"},
    # Data parallel (kubectl get -o wide): ranks and the group's rate; describe lists each worker.
    {"name": "World", "type": "integer", "jsonPath": ".status.worldSize", "priority": 1},
    {"name": "Tokens/s", "type": "number", "jsonPath": ".status.progress.tokensPerSecond", "priority": 1},
    {"name": "Tokens/s/GPU", "type": "number", "jsonPath": ".status.progress.tokensPerSecondPerGpu", "priority": 1},
    # Where a preempted or evicted job would resume (-o wide): progress minus this is what it would redo.
    {"name": "Checkpoint", "type": "integer", "jsonPath": ".status.progress.checkpointStep", "priority": 1},
    {"name": "Adapter", "type": "string", "jsonPath": ".status.result.adapterUri", "priority": 1},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def to_structural(node: dict, defs: dict) -> dict:
    """A pydantic JSON schema node as a Kubernetes structural schema node."""
    node = dict(node)
    if "$ref" in node:
        target = defs[node.pop("$ref").split("/")[-1]]
        merged = {**target, **node}  # field-level description/extras win over the model's own
        if "x-kubernetes-validations" in target and "x-kubernetes-validations" in node:
            merged["x-kubernetes-validations"] = target["x-kubernetes-validations"] + node["x-kubernetes-validations"]
        return to_structural(merged, defs)
    if "anyOf" in node:  # Optional[X]: absence means None, so only X remains
        variants = [v for v in node.pop("anyOf") if v.get("type") != "null"]
        if len(variants) != 1:
            raise ValueError(f"cannot express union {variants} in a structural schema")
        return to_structural({**variants[0], **node}, defs)
    out: dict = {}
    for key, value in node.items():
        if key == "description":
            out[key] = " ".join(value.split())  # docstrings wrap; kubectl explain re-wraps
        elif key in _KEPT:
            out[key] = value
        elif key.startswith("x-kubernetes-"):
            out[key] = value
        elif key == "exclusiveMinimum":  # OpenAPI v3.0: a boolean beside minimum
            out["minimum"], out["exclusiveMinimum"] = value, True
        elif key == "exclusiveMaximum":
            out["maximum"], out["exclusiveMaximum"] = value, True
        elif key == "const":
            out["enum"] = [value]
    if node.get("default", "unset") is None:
        out.pop("default")
    if "properties" in node:
        out["type"] = "object"
        out["properties"] = {k: to_structural(v, defs) for k, v in node["properties"].items()}
    elif node.get("type") == "object" and not node.get("x-kubernetes-preserve-unknown-fields"):
        extra = node.get("additionalProperties")
        if isinstance(extra, dict):
            out["additionalProperties"] = to_structural(extra, defs)
    if "items" in node:
        out["items"] = to_structural(node["items"], defs)
    if node.get("format") == "date-time":
        out.pop("default", None)
    if out.get("type") == "integer" and isinstance(out.get("default"), float):
        out["default"] = int(out["default"])
    if "required" in out and not out["required"]:
        out.pop("required")
    return out


def schema_of(model: type) -> dict:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    return to_structural(raw, raw.get("$defs", {}))


def render_crd() -> dict:
    spec = schema_of(QLoRAJobSpec)
    status = schema_of(QLoRAJobStatus)
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{PLURAL}.{GROUP}",
            "annotations": {"qlora-operator.dev/generated-by": "python -m qlora_api.crd"},
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": SHORT_NAMES,
                "categories": CATEGORIES,
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": copy.deepcopy(PRINTER_COLUMNS),
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": "A QLoRA fine-tuning job: a 4-bit base model, a LoRA adapter, "
                            "a dataset, and an S3 location where the trained adapter is published.",
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": spec,
                                "status": status,
                            },
                        }
                    },
                }
            ],
        },
    }


HEADER = "# Generated from operator/qlora_api by `make crds` (python -m qlora_api.crd). Do not edit.\n"


def render_crd_yaml() -> str:
    return HEADER + yaml.safe_dump(render_crd(), sort_keys=False, width=100)


def render_chart_crd_template() -> str:
    body = yaml.safe_dump(render_crd(), sort_keys=False, width=100)
    keep = (
        "  annotations:\n"
        "    {{- if .Values.crds.keep }}\n"
        "    helm.sh/resource-policy: keep\n"
        "    {{- end }}\n"
    )
    body = body.replace("  annotations:\n", keep, 1)
    return HEADER + "{{- if .Values.crds.install }}\n" + body + "{{- end }}\n"


def rendered_targets() -> dict[Path, str]:
    return {CRD_PATH: render_crd_yaml(), CHART_CRD_PATH: render_chart_crd_template()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if the checked-in CRDs are stale")
    args = parser.parse_args(argv)
    from qlora_api.field_reference import README, updated_readme

    targets = rendered_targets()
    if README.exists():
        targets[README] = updated_readme(README.read_text())
    stale = [p for p, text in targets.items() if not p.exists() or p.read_text() != text]
    if args.check:
        for path in stale:
            print(f"{path.relative_to(REPO_ROOT)} is out of date: run `make crds`", file=sys.stderr)
        return 1 if stale else 0
    for path, text in targets.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path.relative_to(REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
