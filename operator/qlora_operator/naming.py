"""Names and labels of what the operator creates for a QLoRAJob.

Names are deterministic (`<qlorajob>-<attempt>`), so a replayed create gets 409 Conflict instead
of a second Job. Job names end up in pod labels, so they are kept to 63 characters: a longer
QLoRAJob name is cut and made unique again with a hash of the whole name.
"""

import hashlib

from qlora_api.meta import GROUP, LABEL_ATTEMPT, LABEL_JOB_NAME, LABEL_MANAGED_BY, MANAGED_BY

MAX_LABEL = 63
LABEL_NAME = "app.kubernetes.io/name"
LABEL_INSTANCE = "app.kubernetes.io/instance"
TRAINER_APP = "qlora-trainer"
# The full QLoRAJob name, for when the label had to be shortened.
ANNOTATION_JOB_NAME = f"{GROUP}/qlorajob-name"


def _fit(name: str, suffix: str = "") -> str:
    if len(name) + len(suffix) <= MAX_LABEL:
        return name + suffix
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    keep = MAX_LABEL - len(suffix) - len(digest) - 1
    return f"{name[:keep].rstrip('-.')}-{digest}{suffix}"


def trainer_job_name(qlorajob: str, attempt: int) -> str:
    return _fit(qlorajob, f"-{attempt}")


def config_map_name(qlorajob: str, attempt: int) -> str:
    return _fit(qlorajob, f"-{attempt}-config")


def label_value(qlorajob: str) -> str:
    return _fit(qlorajob)


def child_labels(qlorajob: str, attempt: int) -> dict[str, str]:
    return {
        LABEL_NAME: TRAINER_APP,
        LABEL_INSTANCE: label_value(qlorajob),
        LABEL_MANAGED_BY: MANAGED_BY,
        LABEL_JOB_NAME: label_value(qlorajob),
        LABEL_ATTEMPT: str(attempt),
    }


def children_selector(qlorajob: str) -> str:
    """Label selector for everything that belongs to one QLoRAJob (owner uid is checked too)."""
    return f"{LABEL_JOB_NAME}={label_value(qlorajob)},{LABEL_MANAGED_BY}={MANAGED_BY}"


def attempt_of(obj: dict) -> int | None:
    value = (obj.get("metadata", {}).get("labels") or {}).get(LABEL_ATTEMPT, "")
    return int(value) if value.isdigit() else None
