"""What Kueue says about a trainer Job, read from the Job's labels and its Workload. Pure functions.

Kueue (sigs.k8s.io/kueue) queues Jobs labelled with a LocalQueue: it keeps such a Job suspended
until its Workload is admitted (quota reserved in the LocalQueue's ClusterQueue), unsuspends it,
and suspends it again when it evicts the Workload (preemption by a higher priority, deactivation).
A QLoRAJob opts in with the same label; the operator copies it to each trainer Job.
"""

from collections.abc import Mapping

from qlora_operator.pod_facts import any_condition, condition

QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
# A WorkloadPriorityClass: Kueue-only priority, which unlike the pod's priorityClassName (also
# read by Kueue) does not let the trainer pod preempt other pods in kube-scheduler.
PRIORITY_CLASS_LABEL = "kueue.x-k8s.io/priority-class"
JOB_UID_LABEL = "kueue.x-k8s.io/job-uid"  # on each Workload: the uid of the Job it stands for
WORKLOADS_PATH = "/apis/kueue.x-k8s.io/v1beta2/namespaces/{ns}/workloads"


def queue_labels(labels: Mapping[str, str] | None) -> dict[str, str]:
    """The Kueue labels of a QLoRAJob that its trainer Jobs carry too."""
    return {k: v for k, v in (labels or {}).items() if k in (QUEUE_LABEL, PRIORITY_CLASS_LABEL) and v}


def queue_name(obj: Mapping) -> str | None:
    return ((obj.get("metadata") or {}).get("labels") or {}).get(QUEUE_LABEL) or None


def is_active(workload: Mapping) -> bool:
    return (workload.get("spec") or {}).get("active", True) is not False


def eviction(workload: Mapping | None) -> dict | None:
    """Evicted=True while Kueue takes the Workload's quota back (reason Preempted, Deactivated, ...)."""
    return condition(dict(workload), "Evicted") if workload else None


def admitted(workload: Mapping | None) -> bool:
    return bool(workload) and condition(dict(workload), "Admitted") is not None


def quota_reserved(workload: Mapping | None) -> bool:
    return bool(workload) and condition(dict(workload), "QuotaReserved") is not None


def waiting_message(workload: Mapping) -> str:
    """Kueue's own words for why the Workload is not admitted (e.g. "couldn't assign flavors to pod
    set main: insufficient unused quota for nvidia.com/gpu in flavor gpu, 1 more needed")."""
    if admitted(workload):
        return "admitted; Kueue is starting the Job"
    quota = any_condition(dict(workload), "QuotaReserved")
    if quota and quota.get("status") == "False" and quota.get("message"):
        return quota["message"]
    if quota and quota.get("status") == "True":
        return f"{quota.get('message') or 'quota reserved'}; waiting for the admission checks"
    return "waiting for Kueue to consider it"
