"""metav1.Condition bookkeeping: lastTransitionTime moves only when the status does."""

from datetime import datetime

from qlora_api import Condition, ConditionType, QLoRAJobStatus


def find(status: QLoRAJobStatus, ctype: str) -> Condition | None:
    return next((c for c in status.conditions if c.type == ctype), None)


def is_true(status: QLoRAJobStatus, ctype: str) -> bool:
    cond = find(status, ctype)
    return cond is not None and cond.status == "True"


def is_terminal(status: QLoRAJobStatus) -> bool:
    return is_true(status, ConditionType.SUCCEEDED) or is_true(status, ConditionType.FAILED)


def set_condition(status: QLoRAJobStatus, ctype: str, value: bool | str, reason: str, message: str,
                  generation: int, now: datetime) -> None:
    """Sets one condition in place, keeping lastTransitionTime when the status stays the same."""
    value = {True: "True", False: "False"}.get(value, value)
    message = message[:32768]
    existing = find(status, ctype)
    if existing is None:
        status.conditions.append(Condition(type=ctype, status=value, reason=reason, message=message,
                                           last_transition_time=now, observed_generation=generation))
        return
    if existing.status != value:
        existing.last_transition_time = now
    existing.status, existing.reason, existing.message = value, reason, message
    existing.observed_generation = generation


def remove_condition(status: QLoRAJobStatus, ctype: str) -> None:
    status.conditions[:] = [c for c in status.conditions if c.type != ctype]
