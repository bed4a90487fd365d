"""The run's configuration: a TrainerRunConfig (the operator's own model) read from a JSON file."""

import json
from pathlib import Path

from pydantic import ValidationError
from qlora_api import TrainerRunConfig

from qlora_trainer.errors import invalid_config


def load_run_config(path: str | Path) -> TrainerRunConfig:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise invalid_config(f"cannot read the config file {path}: {exc.strerror or exc}") from exc
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise invalid_config(f"{path} is not valid JSON: {exc}") from exc
    try:
        return TrainerRunConfig.model_validate(data)
    except ValidationError as exc:
        raise invalid_config(f"{path}: {describe_validation_error(exc)}") from exc


def describe_validation_error(exc: ValidationError) -> str:
    """pydantic's errors as one line: `spec.training.batchSize: must be >= 1; ...` (wire names)."""
    parts = []
    for error in exc.errors()[:5]:
        where = ".".join(str(p) for p in error["loc"]) or "config"
        parts.append(f"{where}: {error['msg']}")
    more = len(exc.errors()) - 5
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")
