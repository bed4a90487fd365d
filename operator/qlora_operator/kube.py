"""The operator's only door to the API server: read a QLoRAJob and its children, apply planned
actions, write status, record Events. Thin on purpose; every decision is made elsewhere.

Plain dicts in and out, through the kubernetes client's authenticated transport (its typed
models would only be converted back and forth).
"""

import json
import logging
import os
import socket
import uuid
from dataclasses import replace
from datetime import datetime
from urllib.parse import quote

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from qlora_api import GROUP, PLURAL, VERSION, QLoRAJobStatus
from qlora_api.meta import LABEL_MANAGED_BY, MANAGED_BY

from qlora_operator import timestamps
from qlora_operator.derivation import OperatorEvent
from qlora_operator.kueue_facts import JOB_UID_LABEL, WORKLOADS_PATH, queue_name
from qlora_operator.naming import children_selector
from qlora_operator.observation import Observed, Snapshot, group_children, latest_progress, pod_to_tail
from qlora_operator.planning import Action, Create, Patch
from qlora_operator.pod_facts import TRAINER_CONTAINER
from qlora_operator.rejection import Rejected
from qlora_operator.resource import QLoRAJob, merge_patch

log = logging.getLogger(__name__)
COMPONENT = "qlora-operator"
MERGE_PATCH = "application/merge-patch+json"
_COLLECTIONS = {"ConfigMap": "/api/v1/namespaces/{ns}/configmaps", "Job": "/apis/batch/v1/namespaces/{ns}/jobs",
                "Service": "/api/v1/namespaces/{ns}/services", "Workload": WORKLOADS_PATH}


CONNECTIONS = 80


class Conflict(Exception):
    """The object changed since it was read: derive again from a fresh read."""


def load_client() -> client.ApiClient:
    """In a pod: its ServiceAccount; elsewhere: $KUBECONFIG or ~/.kube/config."""
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    configuration = client.Configuration.get_default_copy()
    # One connection per thread that may call at once (kopf's handler threads, the reconcile workers,
    # the Event posters, the resync): the default pool (5 per core) is smaller, and a connection it
    # discards is a new TLS handshake.
    configuration.connection_pool_maxsize = CONNECTIONS
    return client.ApiClient(configuration)


class Kube:
    def __init__(self, api: client.ApiClient, timeout: float = 30.0):
        self.api = api
        self.timeout = timeout
        self.instance = os.environ.get("HOSTNAME") or socket.gethostname()

    # --- transport ---------------------------------------------------------------------------
    def _call(self, method: str, path: str, *, query: dict | None = None, body=None,
              content_type: str = "application/json", raw: bool = False, timeout: float | None = None):
        headers = {"Accept": "*/*" if raw else "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type
        request = self.api.param_serialize(method=method, resource_path=path, header_params=headers, body=body,
                                           query_params=list((query or {}).items()) or None,
                                           auth_settings=["BearerToken"])
        response = self.api.call_api(*request, _request_timeout=timeout or self.timeout)
        response.read()
        if not 200 <= response.status < 300:
            raise ApiException(http_resp=response)
        return response.data.decode("utf-8", errors="replace") if raw else json.loads(response.data)

    @staticmethod
    def _qlorajob_path(namespace: str, name: str = "") -> str:
        path = f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}"
        return f"{path}/{quote(name)}" if name else path

    # --- reading ------------------------------------------------------------------------------
    def get_qlorajob(self, namespace: str, name: str) -> dict | None:
        try:
            return self._call("GET", self._qlorajob_path(namespace, name))
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def observe(self, job: QLoRAJob, now: datetime, log_tail_lines: int, with_pods: bool = True) -> Observed:
        """The job's children, fresh from the API server (not from a cache that may lag), and the
        trainer's newest progress line from its log. A finished job needs its Jobs only (for TTLs)."""
        query = {"labelSelector": children_selector(job.name)}
        lists = {"ConfigMap": [], "Job": [], "Pod": []}
        for kind, path in (("Job", "/apis/batch/v1/namespaces/{ns}/jobs"),
                           ("ConfigMap", "/api/v1/namespaces/{ns}/configmaps"),
                           ("Pod", "/api/v1/namespaces/{ns}/pods")):
            if kind == "Job" or with_pods:
                lists[kind] = self._call("GET", path.format(ns=job.namespace), query=query).get("items", [])
        queued = [j for j in lists["Job"] if queue_name(j)]
        workloads = self.workloads_of(job.namespace, queued) if with_pods and queued else []
        observed = group_children(job.uid, now, lists["ConfigMap"], lists["Job"], lists["Pod"], workloads)
        return self.with_progress(job.namespace, observed, log_tail_lines) if with_pods else observed

    def with_progress(self, namespace: str, observed: Observed, log_tail_lines: int) -> Observed:
        """`observed` with the newest progress line of its running (or just exited) trainer: one log
        read, and none for a job with no trainer started, so the reads are bounded by the GPUs in use."""
        pod = pod_to_tail(observed)
        if pod is None:
            return observed
        text = self.pod_log(namespace, pod["metadata"]["name"], log_tail_lines)
        progress = latest_progress(text) if text else None
        return replace(observed, progress=progress)

    def snapshot(self, namespaces: tuple[str, ...]) -> Snapshot:
        """Every QLoRAJob served and every child of ours: four LISTs per namespace (four in all when
        serving every namespace), whatever the number of jobs."""
        # resourceVersion 0: from the API server's watch cache, with no etcd round trip. It may lag
        # by the cache's delay (milliseconds); for a safety net that is one more interval at worst,
        # and every write is still decided on a fresh reconcile's reads.
        selector = {"labelSelector": f"{LABEL_MANAGED_BY}={MANAGED_BY}", "resourceVersion": "0"}
        paths = {"QLoRAJob": f"/apis/{GROUP}/{VERSION}/namespaces/{{ns}}/{PLURAL}",
                 "ConfigMap": "/api/v1/namespaces/{ns}/configmaps", "Job": "/apis/batch/v1/namespaces/{ns}/jobs",
                 "Pod": "/api/v1/namespaces/{ns}/pods"}
        lists: dict[str, list[dict]] = {kind: [] for kind in paths}
        for kind, path in paths.items():
            query = {"resourceVersion": "0"} if kind == "QLoRAJob" else selector
            targets = [path.format(ns=ns) for ns in namespaces] if namespaces else [path.replace(
                "namespaces/{ns}/", "")]
            for target in targets:
                lists[kind] += self._call("GET", target, query=query).get("items", [])
        return Snapshot(lists["QLoRAJob"], lists["ConfigMap"], lists["Job"], lists["Pod"])

    def workloads_of(self, namespace: str, jobs: list[dict]) -> list[dict]:
        """Kueue's Workloads for these Jobs; none where Kueue is not installed (yet), or where the
        operator may not read them (the status then cannot quote Kueue, but the job still runs)."""
        uids = ",".join(sorted(j["metadata"]["uid"] for j in jobs))
        try:
            return self._call("GET", WORKLOADS_PATH.format(ns=namespace),
                              query={"labelSelector": f"{JOB_UID_LABEL} in ({uids})"}).get("items", [])
        except ApiException as e:
            if e.status == 403:
                log.warning("listing Kueue Workloads in %s is forbidden: grant the operator get, list and patch "
                            "on workloads.kueue.x-k8s.io", namespace)
            if e.status in (403, 404):
                return []
            raise

    def pod_log(self, namespace: str, pod: str, tail_lines: int) -> str | None:
        path = f"/api/v1/namespaces/{namespace}/pods/{quote(pod)}/log"
        try:
            return self._call("GET", path, query={"container": TRAINER_CONTAINER, "tailLines": tail_lines},
                              raw=True)
        except ApiException as e:
            # The container has not started, or its node cannot serve logs right now: progress waits.
            log.debug("no log from pod %s/%s: %s %s", namespace, pod, e.status, e.reason)
            return None

    # --- writing ------------------------------------------------------------------------------
    def apply(self, namespace: str, action: Action) -> bool:
        """True if the action changed something; a create that finds the object there already
        (a replay, or a restart after the create) is a no-op."""
        collection = _COLLECTIONS[action.kind].format(ns=namespace)
        try:
            if isinstance(action, Create):
                self._call("POST", collection, body=action.obj)
            elif isinstance(action, Patch):
                self._call("PATCH", f"{collection}/{quote(action.name)}", body=action.patch, content_type=MERGE_PATCH)
            return True
        except ApiException as e:
            if isinstance(action, Create) and e.status == 409:
                return False
            if isinstance(action, Patch) and e.status == 404:
                return False  # gone meanwhile; the next reconcile sees it
            if isinstance(action, Create) and e.status in (400, 422):
                raise Rejected(action.kind, action.name, _status_message(e)) from e
            raise

    def patch_status(self, job: QLoRAJob, status: QLoRAJobStatus) -> None:
        """Writes the whole status, guarded by the resourceVersion it was derived from, so a stale
        derivation (another reconcile, another operator instance) can never overwrite a newer one."""
        body = {"metadata": {"resourceVersion": job.resource_version},
                "status": merge_patch(job.status.to_wire(), status.to_wire())}
        try:
            self._call("PATCH", self._qlorajob_path(job.namespace, job.name) + "/status", body=body,
                       content_type=MERGE_PATCH)
        except ApiException as e:
            if e.status in (404, 409):
                raise Conflict(f"{job.key} changed while it was reconciled ({e.status})") from e
            raise

    def post_event(self, job: QLoRAJob, event: OperatorEvent, now: datetime) -> None:
        stamp = timestamps.format(now)
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            # Cut so that a QLoRAJob name of 253 characters still makes a valid Event name.
            "metadata": {"name": f"{job.name[:240]}.{uuid.uuid4().hex[:12]}", "namespace": job.namespace},
            "involvedObject": job.object_reference(),
            "type": event.type,
            "reason": event.reason,
            "message": event.message,
            "source": {"component": COMPONENT},
            "reportingComponent": COMPONENT,
            "reportingInstance": self.instance[:128],
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "count": 1,
        }
        try:
            self._call("POST", f"/api/v1/namespaces/{job.namespace}/events", body=body)
        except ApiException as e:  # Events are best effort; the status already says it
            log.warning("could not record event %s on %s: %s %s", event.reason, job.key, e.status, e.reason)


def _status_message(error: ApiException) -> str:
    """The message of the Status object the API server answered with, or the reason phrase."""
    try:
        return str(json.loads(error.body).get("message") or error.reason)
    except (TypeError, ValueError, AttributeError):
        return str(error.reason)
