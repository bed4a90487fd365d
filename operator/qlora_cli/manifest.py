"""A QLoRAJob manifest from `qlora submit` flags, or from a file with flags layered on top. Pure.

The API server is the judge of what is valid (its CRD comes from qlora_api): this only places
each flag at its spec path, so the server's field paths in an error match the flags' help.
"""

from typing import Any

import yaml
from qlora_api.meta import API_VERSION, KIND

# flag name -> spec path; the flag's help is the field's description in qlora_api.spec.
SPEC_FLAGS: dict[str, str] = {
    "model": "model.uri",
    "revision": "model.revision",
    "dataset": "dataset.uri",
    "eval_dataset": "dataset.evalUri",
    "record_format": "dataset.recordFormat",
    "bucket": "output.bucket",
    "prefix": "output.prefix",
    "endpoint_url": "output.endpointUrl",
    "region": "output.region",
    "addressing_style": "output.addressingStyle",
    "secret": "output.credentialsSecretRef.name",
    "merged_export": "output.mergedExport",
    "rank": "lora.r",
    "alpha": "lora.alpha",
    "dropout": "lora.dropout",
    "target_modules": "lora.targetModules",
    "epochs": "training.epochs",
    "max_steps": "training.maxSteps",
    "learning_rate": "training.learningRate",
    "batch_size": "training.batchSize",
    "grad_accum": "training.gradientAccumulationSteps",
    "max_seq_length": "training.maxSeqLength",
    "packing": "training.packing",
    "logging_steps": "training.loggingSteps",
    "checkpoint_steps": "training.checkpointSteps",
    "compute_dtype": "quantization.computeDtype",
    "gpus": "resources.gpu.count",
    "gpu_product": "resources.gpu.product",
    "memory": "resources.memory",
    "cpu": "resources.cpu",
    "image": "resources.image",
    "deadline": "activeDeadlineSeconds",
    "backoff_limit": "backoffLimit",
}


def set_path(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for key in parents:
        tree = tree.setdefault(key, {})
    tree[leaf] = value


def parse_set(assignment: str) -> tuple[str, Any]:
    """`training.warmupSteps=10` -> ("training.warmupSteps", 10): the value is read as YAML."""
    path, sep, raw = assignment.partition("=")
    if not sep or not path:
        raise ValueError(f"--set wants PATH=VALUE, got {assignment!r}")
    return path.removeprefix("spec."), yaml.safe_load(raw) if raw else ""


def build_manifest(name: str | None, namespace: str, flags: dict[str, Any], sets: list[str],
                   base: dict | None = None) -> dict:
    manifest = base or {"apiVersion": API_VERSION, "kind": KIND, "metadata": {}, "spec": {}}
    manifest.setdefault("apiVersion", API_VERSION)
    manifest.setdefault("kind", KIND)
    metadata = manifest.setdefault("metadata", {})
    if name:
        metadata["name"] = name
    metadata["namespace"] = namespace
    spec = manifest.setdefault("spec", {}) or {}
    manifest["spec"] = spec
    for flag, path in SPEC_FLAGS.items():
        value = flags.get(flag)
        if value is None or value == ():
            continue
        set_path(spec, path, list(value) if isinstance(value, tuple) else value)
    for assignment in sets:
        path, value = parse_set(assignment)
        set_path(spec, path, value)
    return manifest


def load_manifest_file(text: str) -> dict:
    manifest = yaml.safe_load(text)
    if not isinstance(manifest, dict) or manifest.get("kind", KIND) != KIND:
        raise ValueError(f"the file does not hold a {KIND}")
    return manifest
