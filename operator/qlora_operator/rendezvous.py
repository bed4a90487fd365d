"""Data parallel across GPUs and pods: the trainer's torchrun arguments, the Indexed Job's fields and
the headless Service its pods find each other through. Pure.

One pod with gpu.count > 1: the trainer runs gpu.count processes under torchrun (standalone
rendezvous on the pod's own loopback). workers > 1: an Indexed Job of `workers` pods, each the same
trainer with gpu.count processes; a pod's node rank is its completion index (JOB_COMPLETION_INDEX,
which the Job controller sets), and the rendezvous is at index 0's stable name `<job>-0.<service>`,
which the headless Service gives it (the Job controller sets each pod's hostname to
`<job>-<index>`; the pod's subdomain is the Service). All pods start together or not at all: Kueue
admits the Job as one workload where it is installed, and without Kueue the status says how many
workers are still waiting for a node.
"""

from qlora_api.meta import LABEL_ATTEMPT, LABEL_JOB_NAME

from qlora_operator.naming import label_value, trainer_job_name
from qlora_operator.resource import QLoRAJob

RENDEZVOUS_PORT = 29500
# With several pods, any failed pod fails the attempt: backoffLimit 0 and no Ignore rules, because a
# replacement pod cannot join a group whose other ranks already failed (or hung) without it. The
# Job controller then stops the other pods, and the operator's next attempt resumes the whole group
# from the newest checkpoint (a disruption counts as an attempt here, unlike for one pod).
GROUP_POD_FAILURE_POLICY = {
    "rules": [{"action": "FailJob", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}]
}


def world_size(job: QLoRAJob) -> int:
    res = job.spec.resources
    return res.gpu.count * res.workers


def service_name(job: QLoRAJob, attempt: int) -> str:
    return trainer_job_name(job.name, attempt)  # a Service and a Job may share a name


def master_address(job: QLoRAJob, attempt: int) -> str:
    """Index 0's stable DNS name (relative: the pod's search path adds <namespace>.svc...)."""
    return f"{trainer_job_name(job.name, attempt)}-0.{service_name(job, attempt)}"


def launch_args(job: QLoRAJob, attempt: int) -> list[str]:
    """What the trainer CLI adds to run as a data-parallel group (nothing for one GPU)."""
    res = job.spec.resources
    if world_size(job) == 1:
        return []
    args = [f"--nproc-per-node={res.gpu.count}"]
    if res.workers > 1:
        args += [f"--nnodes={res.workers}", f"--master-addr={master_address(job, attempt)}",
                 f"--master-port={RENDEZVOUS_PORT}"]
    return args


def indexed_job_fields(job: QLoRAJob, attempt: int) -> dict:
    """The Job spec fields of a several-pod group (none for one pod)."""
    workers = job.spec.resources.workers
    if workers == 1:
        return {}
    return {"completionMode": "Indexed", "completions": workers, "parallelism": workers,
            "podFailurePolicy": GROUP_POD_FAILURE_POLICY}


def render_rendezvous_service(job: QLoRAJob, attempt: int, metadata: dict) -> dict:
    """The headless Service that gives each pod of the attempt a DNS name (no cluster IP, no load
    balancing; addresses published before readiness, since the trainer has no readiness probe and
    the group must meet before any pod could call itself ready)."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata,
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {LABEL_JOB_NAME: label_value(job.name), LABEL_ATTEMPT: str(attempt)},
            "ports": [{"name": "rendezvous", "port": RENDEZVOUS_PORT, "targetPort": RENDEZVOUS_PORT}],
        },
    }
