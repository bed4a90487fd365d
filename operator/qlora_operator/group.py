"""The workers of a several-pod attempt (an Indexed Job: one pod per worker), for the status. Pure."""

from qlora_api.status import WorkerStatus

from qlora_operator import pod_facts as pf


def workers_of(pods: list[dict]) -> list[WorkerStatus]:
    """Each worker's newest pod, for the status (kubectl describe shows them as a list)."""
    return [WorkerStatus(index=i, pod=p["metadata"]["name"], node=(p.get("spec") or {}).get("nodeName"),
                         state=pf.worker_state(p))
            for i, p in sorted(pf.newest_per_index(pods).items())]
