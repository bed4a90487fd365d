"""Ready, Reconciling and Stalled: the QLoRAJob's own conditions summed up the way kstatus reads them.

kstatus (sigs.k8s.io/cli-utils/pkg/kstatus, which Flux's health checks and `kpt` use) knows nothing of
Running, Succeeded or Failed. After checking observedGeneration it reads Reconciling=True as
InProgress, Stalled=True as Failed, then Ready (True: Current, False: InProgress); with none of them
it calls a custom resource Current, so a Flux Kustomization that waits would call a job that is still
training done. These follow the "abnormal-true" convention that Flux's own controllers use:
Reconciling and Stalled are there only while True, Ready always.

    pending, queued, running, retrying  Reconciling=True, Ready=False   -> InProgress
    suspended                           Ready=False (Suspended)         -> InProgress
    succeeded                           Ready=True                      -> Current
    failed                              Stalled=True, Ready=False       -> Failed

A suspended job is InProgress, not Current: it has not reached what it exists for (a published
adapter) and will not until someone resumes it, so a Kustomization waiting on it must not report it
ready, nor may a `dependsOn` that consumes the adapter go ahead. kstatus says the same of a suspended
batch/v1 Job ("Job not started"). It is not Failed either: resuming continues from the checkpoint.
Nothing is reconciling meanwhile, so Reconciling is absent and Ready carries the reason.
"""

from datetime import datetime

from qlora_api import ConditionType, QLoRAJobStatus, Reason

from qlora_operator.conditions import find, remove_condition, set_condition

KSTATUS_CONDITION_TYPES = frozenset({ConditionType.READY, ConditionType.RECONCILING, ConditionType.STALLED})


def set_kstatus_conditions(status: QLoRAJobStatus, generation: int, now: datetime) -> None:
    """Derives Ready, Reconciling and Stalled in place from the phase and the other conditions."""
    reason, message = _driving_reason(status)

    def put(ctype: str, value: bool) -> None:
        set_condition(status, ctype, value, reason, message, generation, now)

    put(ConditionType.READY, status.phase == "Succeeded")
    if status.phase == "Failed":
        put(ConditionType.STALLED, True)
    else:
        remove_condition(status, ConditionType.STALLED)
    if status.phase in ("Succeeded", "Failed", "Suspended"):
        remove_condition(status, ConditionType.RECONCILING)
    else:
        put(ConditionType.RECONCILING, True)


def _driving_reason(status: QLoRAJobStatus) -> tuple[str, str]:
    """The reason and message of the condition that explains the phase: the terminal one, Suspended,
    a Scheduled=False (unschedulable or queued: the more specific story), else Running."""
    by_phase = {"Succeeded": ConditionType.SUCCEEDED, "Failed": ConditionType.FAILED,
                "Suspended": ConditionType.SUSPENDED}
    scheduled = find(status, ConditionType.SCHEDULED)
    if status.phase in by_phase:
        cond = find(status, by_phase[status.phase])
    elif scheduled is not None and scheduled.status == "False":
        cond = scheduled
    else:
        cond = find(status, ConditionType.RUNNING)
    if cond is None:  # a new job: Accepted is all there is so far
        return Reason.PENDING, status.message or "waiting for the trainer Job"
    return cond.reason, cond.message
