"""A trainer Job (or its ConfigMap) the API server refuses to create: a permanent failure of the
QLoRAJob, not an error to retry for ever.

The CRD refuses most specs that would make an invalid Job, but some parts are passed through as
they are (spec.resources.affinity, nodeSelector keys): a 400/422 on create means the spec can
never produce a valid Job, so the QLoRAJob ends Failed with the API server's own words, which name
the field. Pure: it returns the status to write.
"""

from datetime import datetime

from qlora_api import ConditionType, QLoRAJobStatus, Reason

from qlora_operator.conditions import set_condition
from qlora_operator.resource import QLoRAJob


class Rejected(Exception):
    """The API server refused an object with 400 Bad Request or 422 Invalid."""

    def __init__(self, kind: str, name: str, message: str):
        super().__init__(f"{kind} {name}: {message}")
        self.kind, self.name, self.message = kind, name, message


def rejected_status(job: QLoRAJob, status: QLoRAJobStatus, rejection: Rejected, now: datetime) -> QLoRAJobStatus:
    new = status.model_copy(deep=True)
    message = (f"the API server refused trainer {rejection.kind} {rejection.name}: {rejection.message}; "
               "fix the spec fields it names (spec.resources passes affinity and nodeSelector keys through "
               "as they are) and create a new QLoRAJob")
    for ctype in (ConditionType.RUNNING, ConditionType.FAILED):
        set_condition(new, ctype, ctype == ConditionType.FAILED, Reason.JOB_REJECTED, message, job.generation, now)
    new.phase, new.message, new.completion_time = "Failed", message, now
    return new
