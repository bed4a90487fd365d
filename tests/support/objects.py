"""Builders for QLoRAJobs, trainer Jobs and pods in the states the API server reports them.

Shapes follow what kube-controller-manager (Job conditions), kube-scheduler (PodScheduled),
the eviction API (DisruptionTarget) and a kubelet (container states) write.
"""

import copy
import json
import uuid
from datetime import UTC, datetime, timedelta

from qlora_api import API_VERSION, KIND, TrainerError, TrainerResultMessage, TrainingResult
from qlora_operator import timestamps
from qlora_operator.rendering import render_trainer_job
from qlora_operator.resource import QLoRAJob

T0 = datetime(2026, 11, 25, 12, 0, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def ts(seconds: float) -> str:
    return timestamps.format(at(seconds))


MINIMAL_SPEC = {
    "model": {"uri": "hf://HuggingFaceTB/SmolLM2-135M-Instruct"},
    "dataset": {"uri": "s3://datasets/chat/train.jsonl"},
    "output": {"bucket": "adapters", "credentialsSecretRef": {"name": "s3-creds"}},
}

# Every field of spec.resources set, for rendering tests and the API server's own validation.
FULL_RESOURCES = {
    "gpu": {"count": 2, "product": "NVIDIA-H100-80GB-HBM3"},
    "cpu": "8",
    "memory": "64Gi",
    "nodeSelector": {"pool": "training"},
    "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}],
    "affinity": {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
        {"weight": 1, "preference": {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}}]}},
    "priorityClassName": "training-low",
    "runtimeClassName": "nvidia",
    "image": "registry.example/custom-trainer:2",
    "imagePullPolicy": "Always",
    "imagePullSecrets": ["regcred"],
}


def qlorajob_manifest(name: str, namespace: str, spec: dict | None = None) -> dict:
    """A QLoRAJob as a user writes it for `kubectl apply`: MINIMAL_SPEC with `spec` merged in."""
    return {"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": name, "namespace": namespace},
            "spec": merge(copy.deepcopy(MINIMAL_SPEC), spec or {})}


def qlorajob_body(name: str = "demo", namespace: str = "ml", spec: dict | None = None, status: dict | None = None,
                  generation: int = 1, uid: str = "0f0e0d0c-0000-4000-8000-000000000001",
                  labels: dict | None = None) -> dict:
    """The same QLoRAJob as the API server returns it."""
    body = qlorajob_manifest(name, namespace, spec)
    if labels:
        body["metadata"]["labels"] = dict(labels)
    body["metadata"].update(uid=uid, generation=generation, resourceVersion="100", creationTimestamp=ts(0))
    if status is not None:
        body["status"] = status
    return body


def qlorajob(**kwargs) -> QLoRAJob:
    return QLoRAJob.from_body(qlorajob_body(**kwargs))


def merge(base: dict, extra: dict) -> dict:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merge(base[key], value)
        else:
            base[key] = value
    return base


# --- trainer Jobs ------------------------------------------------------------------------------

def trainer_job(job: QLoRAJob, attempt: int = 1, *, created: float = 1, finished: str | None = None,
                reason: str = "BackoffLimitExceeded", finished_at: float = 60, image: str = "trainer:test",
                deadline: int | None = None) -> dict:
    """A Job as the API server returns it: rendered by the operator, then uid, timestamps, status."""
    obj = render_trainer_job(job, attempt, default_image=image, active_deadline_seconds=deadline)
    obj["metadata"].update(uid=str(uuid.uuid5(uuid.NAMESPACE_URL, obj["metadata"]["name"] + job.uid)),
                           creationTimestamp=ts(created), resourceVersion="1")
    obj["status"] = {"active": 1, "startTime": ts(created)}
    if finished == "Complete":
        obj["status"] = {"succeeded": 1, "completionTime": ts(finished_at), "startTime": ts(created),
                         "conditions": [_cond("SuccessCriteriaMet", finished_at), _cond("Complete", finished_at)]}
    elif finished == "Failed":
        obj["status"] = {"failed": 1, "startTime": ts(created), "conditions": [
            _cond("FailureTarget", finished_at, reason), _cond("Failed", finished_at, reason)]}
    return obj


def _cond(ctype: str, seconds: float, reason: str | None = None, message: str = "", status: str = "True") -> dict:
    cond = {"type": ctype, "status": status, "lastTransitionTime": ts(seconds), "lastProbeTime": ts(seconds)}
    if reason:
        cond["reason"] = reason
    if message:
        cond["message"] = message
    return cond


# --- pods --------------------------------------------------------------------------------------

def pod(trainer: dict, suffix: str = "abcde", *, created: float = 2, node: str | None = "gpu-node-0",
        phase: str = "Pending", state: dict | None = None, last_state: dict | None = None,
        conditions: list[dict] | None = None, deleting: bool = False, status_reason: str | None = None) -> dict:
    template = trainer["spec"]["template"]
    meta = {
        "name": f"{trainer['metadata']['name']}-{suffix}",
        "namespace": trainer["metadata"]["namespace"],
        "uid": str(uuid.uuid5(uuid.NAMESPACE_URL, trainer["metadata"]["name"] + suffix)),
        "creationTimestamp": ts(created),
        "labels": {**template["metadata"]["labels"], "batch.kubernetes.io/job-name": trainer["metadata"]["name"]},
        "annotations": dict(template["metadata"]["annotations"]),
        "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": trainer["metadata"]["name"],
                             "uid": trainer["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}],
    }
    if deleting:
        meta["deletionTimestamp"] = ts(created + 30)
    spec = copy.deepcopy(template["spec"])
    conds = list(conditions or [])
    if node:
        spec["nodeName"] = node
        conds.insert(0, _cond("PodScheduled", created))
    status = {"phase": phase, "conditions": conds}
    if status_reason:
        status["reason"] = status_reason
    if state is not None or last_state is not None:
        status["containerStatuses"] = [{"name": "trainer", "image": template["spec"]["containers"][0]["image"],
                                        "ready": "running" in (state or {}), "restartCount": 0,
                                        "state": state or {}, "lastState": last_state or {}}]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec, "status": status}


def unschedulable(message: str) -> dict:
    return _cond("PodScheduled", 3, "Unschedulable", message, status="False")


def disruption(reason: str = "EvictionByEvictionAPI", message: str = "Eviction API: evicting") -> dict:
    return _cond("DisruptionTarget", 20, reason, message)


def waiting(reason: str, message: str = "") -> dict:
    return {"waiting": {"reason": reason, **({"message": message} if message else {})}}


def running(started: float = 5) -> dict:
    return {"running": {"startedAt": ts(started)}}


def terminated(exit_code: int, message: str = "", reason: str | None = None, finished: float = 50) -> dict:
    reason = reason or ("Completed" if exit_code == 0 else "Error")
    state = {"exitCode": exit_code, "reason": reason, "startedAt": ts(5), "finishedAt": ts(finished)}
    if message:
        state["message"] = message
    return {"terminated": state}


def result_message(uri: str = "s3://adapters/adapters/ml/demo/run/", manifest: bool = True) -> str:
    """A trainer's result; with `manifest`, the URI and digest of the manifest it wrote last."""
    extra = {"manifest_uri": uri + "manifest.json", "manifest_sha256": "ab" * 32} if manifest else {}
    return TrainerResultMessage(result=TrainingResult(adapter_uri=uri, train_seconds=42.0, **extra)).model_dump_json(
        by_alias=True, exclude_none=True)


def error_message(reason: str, message: str, exit_code: int) -> str:
    return json.dumps(TrainerError(reason=reason, message=message, exit_code=exit_code).to_wire())


def config_map_for(job: QLoRAJob, attempt: int) -> dict:
    from qlora_operator.rendering import render_config_map

    cm = render_config_map(job, attempt)
    cm["metadata"].update(uid=f"cm-{attempt}", creationTimestamp=ts(1))
    return cm


def observe(job: QLoRAJob, jobs: list[dict] = (), pods: list[dict] = (), *, now: float = 100,
            progress=None, config_maps: list[dict] | None = None, workloads: list[dict] = ()):
    """An Observed as kube.observe builds it (config maps default to one per Job)."""
    import dataclasses

    from qlora_operator.observation import group_children

    if config_maps is None:
        from qlora_operator.naming import attempt_of

        config_maps = [config_map_for(job, attempt_of(j)) for j in jobs]
    grouped = group_children(job.uid, at(now), list(config_maps), list(jobs), list(pods), list(workloads))
    return dataclasses.replace(grouped, progress=progress)


# --- Kueue -------------------------------------------------------------------------------------

QUOTA_MESSAGE = ("couldn't assign flavors to pod set main: insufficient unused quota for nvidia.com/gpu in "
                 "flavor gpu, 1 more needed")


def workload(trainer: dict, *, conditions: list[dict] = (), active: bool | None = None) -> dict:
    """The Workload Kueue's Job integration creates for a queued Job (controlled by the Job)."""
    meta = trainer["metadata"]
    spec = {"queueName": meta["labels"]["kueue.x-k8s.io/queue-name"], "podSets": []}
    if active is not None:
        spec["active"] = active
    return {
        "apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "Workload",
        "metadata": {"name": f"job-{meta['name']}-1a2b3", "namespace": meta["namespace"],
                     "labels": {"kueue.x-k8s.io/job-uid": meta["uid"]},
                     "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": meta["name"],
                                          "uid": meta["uid"], "controller": True}]},
        "spec": spec,
        "status": {"conditions": list(conditions)},
    }


def wl_cond(ctype: str, status: str, reason: str, message: str, seconds: float = 5) -> dict:
    return {"type": ctype, "status": status, "reason": reason, "message": message,
            "lastTransitionTime": ts(seconds)}


def suspended(trainer: dict) -> dict:
    """The Job as Kueue holds it (or suspends it again after an eviction)."""
    trainer["spec"]["suspend"] = True
    trainer["status"] = {"conditions": [_cond("Suspended", 1, "JobSuspended", "Job suspended")]}
    return trainer


def with_status(job: QLoRAJob, status) -> QLoRAJob:
    """The same QLoRAJob after the operator wrote `status` (what the next reconcile reads)."""
    import dataclasses

    return dataclasses.replace(job, status=status.model_copy(deep=True))
