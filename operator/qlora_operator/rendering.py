"""The children of a QLoRAJob as plain dicts: one ConfigMap and one batch/v1 Job per attempt (and,
for several workers, the headless Service of their rendezvous: rendezvous.py). Pure.

Each attempt's ConfigMap holds the TrainerRunConfig the trainer reads at /etc/qlora/config.json;
the runId is the QLoRAJob's uid, the same for every attempt, so attempt n+1 finds and resumes the
checkpoints of attempt n. The trainer pod gets no Kubernetes credentials at all: it reports
through its log (progress lines) and its termination message (result or error).
"""

import copy
import json

from qlora_api import ExitCode, TrainerRunConfig
from qlora_api.protocol import (
    CONFIG_FILE,
    CONFIG_MOUNT_DIR,
    CONFIG_PATH,
    TERMINATION_GRACE_SECONDS,
    TERMINATION_MESSAGE_PATH,
)
from qlora_api.spec import ResourcesSpec, SecretKeyRefs

from qlora_operator import rendezvous
from qlora_operator.kueue_facts import QUEUE_LABEL, queue_labels
from qlora_operator.naming import ANNOTATION_JOB_NAME, child_labels, config_map_name, trainer_job_name
from qlora_operator.pod_facts import TRAINER_CONTAINER
from qlora_operator.resource import QLoRAJob

GPU_RESOURCE = "nvidia.com/gpu"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
# GPU nodes are usually tainted so that only pods asking for a GPU land there.
GPU_TOLERATION = {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}
CONFIG_VOLUME = "config"
# The non-root user trainer_image/Dockerfile creates (a test keeps the two equal). A fixed uid, not
# just runAsNonRoot, so the kubelet can verify it without inspecting the image, and an image that
# forgot its USER line still runs unprivileged.
TRAINER_UID = 10001

# The trainer needs no privilege at all: it reads a file, talks to S3 and the GPU (the device
# plugin hands the GPU to the container, no capability needed), and writes under /tmp and $HOME.
TRAINER_POD_SECURITY_CONTEXT = {
    "runAsNonRoot": True,
    "runAsUser": TRAINER_UID,
    "runAsGroup": TRAINER_UID,
    "seccompProfile": {"type": "RuntimeDefault"},
}
TRAINER_CONTAINER_SECURITY_CONTEXT = {
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
}

# Pod failures that must not burn the Job's only try (backoffLimit 0): the Job starts a replacement
# pod and the trainer resumes from its last checkpoint. DisruptionTarget covers eviction,
# preemption, taint-based and node-shutdown deletion; exit code INTERRUPTED is the trainer saying
# it was stopped by SIGTERM after checkpointing (deletion without a DisruptionTarget condition).
POD_FAILURE_POLICY = {
    "rules": [
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        {"action": "Ignore", "onExitCodes": {"containerName": TRAINER_CONTAINER, "operator": "In",
                                             "values": [int(ExitCode.INTERRUPTED)]}},
    ]
}


def trainer_run_config(job: QLoRAJob, attempt: int) -> TrainerRunConfig:
    return TrainerRunConfig(namespace=job.namespace, name=job.name, run_id=job.uid, attempt=attempt, spec=job.spec)


def render_config_map(job: QLoRAJob, attempt: int) -> dict:
    config = trainer_run_config(job, attempt).to_wire()
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(job, config_map_name(job.name, attempt), attempt),
        # An attempt's config never changes; immutable also spares the kubelets a watch.
        "immutable": True,
        "data": {CONFIG_FILE: json.dumps(config, indent=2, sort_keys=True) + "\n"},
    }


def render_trainer_job(job: QLoRAJob, attempt: int, *, default_image: str,
                       active_deadline_seconds: int | None) -> dict:
    """The batch/v1 Job of one attempt. backoffLimit 0: the operator decides about retries (it
    knows which exit codes are worth one), the Job only replaces disrupted pods.

    A QLoRAJob labelled with a Kueue LocalQueue hands its Jobs to Kueue: they carry the label and
    are created suspended, which is what Kueue's own Job webhook would enforce (so no pod starts
    before admission, and nothing depends on that webhook being installed); Kueue unsuspends the Job
    once its Workload is admitted. Kueue's priority comes from the pod's priorityClassName, or from
    a `kueue.x-k8s.io/priority-class` label (a WorkloadPriorityClass), copied here as well."""
    name = trainer_job_name(job.name, attempt)
    labels = child_labels(job.name, attempt)
    kueue = queue_labels(job.labels)
    spec = {
        "backoffLimit": 0,
        "podFailurePolicy": POD_FAILURE_POLICY,
        "suspend": job.spec.suspend or QUEUE_LABEL in kueue,
        "template": {
            "metadata": {"labels": labels, "annotations": {ANNOTATION_JOB_NAME: job.name}},
            "spec": render_pod_spec(job, attempt, default_image),
        },
    }
    # Several pods: an Indexed Job whose pods are named through the attempt's headless Service.
    spec.update(rendezvous.indexed_job_fields(job, attempt))
    if job.spec.resources.workers > 1:
        spec["template"]["spec"]["subdomain"] = rendezvous.service_name(job, attempt)
    if active_deadline_seconds is not None:
        spec["activeDeadlineSeconds"] = active_deadline_seconds
    metadata = _metadata(job, name, attempt)
    metadata["labels"].update(kueue)
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": metadata, "spec": spec}


def render_pod_spec(job: QLoRAJob, attempt: int, default_image: str) -> dict:
    res = job.spec.resources
    container = {
        "name": TRAINER_CONTAINER,
        "image": res.image or default_image,
        # args, not command: the image's ENTRYPOINT is the trainer CLI.
        "args": ["--config", CONFIG_PATH, "--termination-log", TERMINATION_MESSAGE_PATH,
                 *rendezvous.launch_args(job, attempt)],
        "env": s3_credentials_env(job.spec.output.credentials_secret_ref),
        "resources": container_resources(res),
        "volumeMounts": [{"name": CONFIG_VOLUME, "mountPath": CONFIG_MOUNT_DIR, "readOnly": True}],
        "terminationMessagePath": TERMINATION_MESSAGE_PATH,
        # A trainer killed before it could write its message still leaves its last log lines.
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": copy.deepcopy(TRAINER_CONTAINER_SECURITY_CONTEXT),
    }
    if res.image_pull_policy:
        container["imagePullPolicy"] = res.image_pull_policy
    pod = {
        "restartPolicy": "Never",
        # No Kubernetes credentials in the pod: the trainer reports through its log and
        # termination message, never through the API.
        "automountServiceAccountToken": False,
        "securityContext": copy.deepcopy(TRAINER_POD_SECURITY_CONTEXT),
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": TERMINATION_GRACE_SECONDS,
        "containers": [container],
        "volumes": [{"name": CONFIG_VOLUME, "configMap": {"name": config_map_name(job.name, attempt)}}],
        "tolerations": tolerations(res),
    }
    selector = dict(res.node_selector)
    if res.gpu.product:
        selector[GPU_PRODUCT_LABEL] = res.gpu.product
    if selector:
        pod["nodeSelector"] = selector
    if res.affinity:
        pod["affinity"] = res.affinity
    if res.priority_class_name:
        pod["priorityClassName"] = res.priority_class_name
    if res.runtime_class_name:
        pod["runtimeClassName"] = res.runtime_class_name
    if res.image_pull_secrets:
        pod["imagePullSecrets"] = [{"name": n} for n in res.image_pull_secrets]
    return pod


def render_rendezvous_service(job: QLoRAJob, attempt: int) -> dict | None:
    """The headless Service of a several-pod attempt (None for one pod)."""
    if job.spec.resources.workers == 1:
        return None
    return rendezvous.render_rendezvous_service(job, attempt,
                                                _metadata(job, rendezvous.service_name(job, attempt), attempt))


def container_resources(res: ResourcesSpec) -> dict:
    """GPUs as request = limit (extended resources allow nothing else); memory as request = limit,
    so the trainer is OOMKilled at a known size rather than evicted under node pressure; CPU as a
    request only, since a CPU limit would throttle the data-loading threads."""
    requests = {GPU_RESOURCE: str(res.gpu.count)}
    limits = {GPU_RESOURCE: str(res.gpu.count)}
    if res.memory:
        requests["memory"] = limits["memory"] = res.memory
    if res.cpu:
        requests["cpu"] = res.cpu
    return {"requests": requests, "limits": limits}


def tolerations(res: ResourcesSpec) -> list[dict]:
    result = [t.to_wire() for t in res.tolerations]
    if GPU_TOLERATION not in result:
        result.append(dict(GPU_TOLERATION))
    return result


def s3_credentials_env(ref: SecretKeyRefs | None) -> list[dict]:
    """S3 keys straight from the referenced Secret: the operator itself never reads Secrets."""
    if ref is None:
        return []

    def from_secret(var: str, key: str) -> dict:
        return {"name": var, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": key}}}

    env = [from_secret("AWS_ACCESS_KEY_ID", ref.access_key_id_key),
           from_secret("AWS_SECRET_ACCESS_KEY", ref.secret_access_key_key)]
    if ref.session_token_key:
        env.append(from_secret("AWS_SESSION_TOKEN", ref.session_token_key))
    return env


def _metadata(job: QLoRAJob, name: str, attempt: int) -> dict:
    return {
        "name": name,
        "namespace": job.namespace,
        "labels": child_labels(job.name, attempt),
        "annotations": {ANNOTATION_JOB_NAME: job.name},
        "ownerReferences": [job.owner_reference()],
    }
