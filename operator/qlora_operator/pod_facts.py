"""What a trainer Job and its pods say about themselves, read from their status. Pure functions."""

import re

from qlora_operator import timestamps

TRAINER_CONTAINER = "trainer"
IMAGE_PULL_WAITING = {"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull"}
CONFIG_WAITING = {"CreateContainerConfigError", "CreateContainerError", "RunContainerError"}
# The kubelet's words for a Secret an env var needs (pkg/kubelet/kubelet_pods.go): the Secret is
# missing, or it lacks the key.
_MISSING_SECRET = re.compile(r'secret "(?P<name>[^"]+)" not found|'
                             r"couldn't find key \S+ in Secret (?:[^/\s]+/)?(?P<owner>\S+)", re.IGNORECASE)


def condition(obj: dict, ctype: str) -> dict | None:
    """The condition of that type if it is True (Job and pod conditions alike)."""
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond.get("type") == ctype and cond.get("status") == "True":
            return cond
    return None


def any_condition(obj: dict, ctype: str) -> dict | None:
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond.get("type") == ctype:
            return cond
    return None


def created(obj: dict):
    return timestamps.parse(obj["metadata"].get("creationTimestamp"))


def by_age(objs: list[dict]) -> list[dict]:
    return sorted(objs, key=lambda o: (o["metadata"].get("creationTimestamp", ""), o["metadata"]["name"]))


def job_finished(job: dict) -> str | None:
    """Complete, Failed or None (still active). FailureTarget/SuccessCriteriaMet come first, while
    pods still terminate; only the final conditions count."""
    for ctype in ("Complete", "Failed"):
        if condition(job, ctype):
            return ctype
    return None


def trainer_status(pod: dict) -> dict:
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        if cs.get("name") == TRAINER_CONTAINER:
            return cs
    return {}


def trainer_terminated(pod: dict) -> dict | None:
    cs = trainer_status(pod)
    return (cs.get("state") or {}).get("terminated") or (cs.get("lastState") or {}).get("terminated")


def trainer_waiting(pod: dict) -> dict | None:
    return (trainer_status(pod).get("state") or {}).get("waiting")


def trainer_running(pod: dict) -> bool:
    return bool((trainer_status(pod).get("state") or {}).get("running"))


def disruption(pod: dict) -> dict | None:
    """The DisruptionTarget condition set by the eviction API, the scheduler's preemption, the
    taint manager or a node shutdown: the pod goes away through no fault of the trainer."""
    return condition(pod, "DisruptionTarget")


def is_preemption(cond: dict) -> bool:
    return "Preemption" in (cond.get("reason") or "")


def scheduling_failure(pod: dict) -> dict | None:
    cond = any_condition(pod, "PodScheduled")
    if cond and cond.get("status") == "False":
        return cond
    return None


def memory_limit(pod: dict) -> str | None:
    for container in (pod.get("spec") or {}).get("containers") or []:
        if container.get("name") == TRAINER_CONTAINER:
            return ((container.get("resources") or {}).get("limits") or {}).get("memory")
    return None


def log_tail(text: str | None, lines: int = 8, chars: int = 1000) -> str:
    if not text:
        return ""
    tail = "\n".join(text.strip().splitlines()[-lines:])
    return tail[-chars:]


COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"


def completion_index(pod: dict) -> int | None:
    """An Indexed Job's pod index (its node rank in a data-parallel group), from the Job controller's annotation."""
    value = (pod["metadata"].get("annotations") or {}).get(COMPLETION_INDEX, "")
    return int(value) if value.isdigit() else None


def newest_per_index(pods: list[dict]) -> dict[int, dict]:
    """index -> the newest pod of that index (a failed index may leave older pods behind)."""
    found: dict[int, dict] = {}
    for pod in by_age(pods):
        index = completion_index(pod)
        if index is not None:
            found[index] = pod
    return found


def worker_state(pod: dict) -> str:
    phase = (pod.get("status") or {}).get("phase") or "Pending"
    return phase if phase in ("Pending", "Running", "Succeeded", "Failed") else "Pending"


def missing_secret(waiting_message: str) -> str | None:
    """The name of the Secret a CreateContainerConfigError is about, or None if it is about something else."""
    found = _MISSING_SECRET.search(waiting_message or "")
    return (found.group("name") or found.group("owner")) if found else None


def pod_terminated(pod: dict) -> bool:
    """The pod's containers can run no more: it ended, or it never got a node before being deleted."""
    status = pod.get("status") or {}
    if status.get("phase") in ("Succeeded", "Failed"):
        return True
    return bool(pod["metadata"].get("deletionTimestamp")) and not (pod.get("spec") or {}).get("nodeName")
