"""The run's configuration: a TrainerRunConfig (the operator's own model) read from a JSON file."""

import copy
import json
import logging
from pathlib import Path

from pydantic import ValidationError
from qlora_api import TrainerRunConfig

from qlora_trainer.errors import invalid_config

log = logging.getLogger(__name__)


def load_run_config(path: str | Path) -> TrainerRunConfig:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise invalid_config(f"cannot read the config file {path}: {exc.strerror or exc}") from exc
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise invalid_config(f"{path} is not valid JSON: {exc}") from exc
    data, unknown = _without_unknown_fields(data)
    if unknown:
        log.warning("%s: ignoring fields this trainer does not know (a newer operator's, most likely): %s",
                    path, ", ".join(unknown))
    try:
        return TrainerRunConfig.model_validate(data)
    except ValidationError as exc:
        raise invalid_config(f"{path}: {describe_validation_error(exc)}") from exc


def _without_unknown_fields(data):
    """The config without the fields the API models do not know, and their wire paths.

    The API models refuse unknown fields (at admission that catches typos), but the config file is
    written by the operator, which may be newer than this trainer image: a field added to the spec
    would then fail every run of an older image. The trainer drops such fields (with one warning)
    and still refuses a known field of the wrong type: only `extra_forbidden` errors are acted on,
    the others are left to the final validation, which reports them."""
    data, unknown = copy.deepcopy(data), []
    while True:  # one more pass if a dropped field uncovers another (each pass drops at least one)
        try:
            TrainerRunConfig.model_validate(data)
            return data, unknown
        except ValidationError as exc:
            dropped = [loc for loc in (e["loc"] for e in exc.errors() if e["type"] == "extra_forbidden")
                       if _drop(data, loc)]
        if not dropped:
            return data, unknown
        unknown += [".".join(str(p) for p in loc) for loc in dropped]


def _drop(data, loc: tuple) -> bool:
    """Remove the field at `loc`; False where the path does not lead to it (a union's tag in the loc)."""
    node = data
    for part in loc[:-1]:
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            return False
    if not isinstance(node, dict) or loc[-1] not in node:
        return False
    del node[loc[-1]]
    return True


def describe_validation_error(exc: ValidationError) -> str:
    """pydantic's errors as one line: `spec.training.batchSize: must be >= 1; ...` (wire names)."""
    parts = []
    for error in exc.errors()[:5]:
        where = ".".join(str(p) for p in error["loc"]) or "config"
        parts.append(f"{where}: {error['msg']}")
    more = len(exc.errors()) - 5
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")
