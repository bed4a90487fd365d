"""The Kubernetes side of pods: watch the ones bound to this node, hand them to the provider, report
their status through `pods/status`, and delete them (grace 0) once a deleted pod's processes are
gone, as kubelet's status manager does. Secrets, ConfigMaps and tokens are read with the node's
own credentials, so the Node authorizer lets through only those of pods bound here.
"""

from __future__ import annotations

import logging
import threading
import time

from .kube_api import ApiError, KubeApi, pod_path
from .launch import ContainerConfigError
from .pod_run import Outcome
from .process_runtime import ProcessProvider
from .status import is_terminal

log = logging.getLogger(__name__)

RESYNC_SECONDS = 10.0
NODE_SHUTDOWN = Outcome("Failed", "Terminated", "Pod was terminated in response to imminent node shutdown.")


class ApiResourceReader:
    """Secrets, ConfigMaps and ServiceAccount tokens for pods, through the API server."""

    def __init__(self, api: KubeApi):
        self.api = api

    def _get(self, kind: str, namespace: str, name: str) -> dict | None:
        try:
            return self.api.get(f"/api/v1/namespaces/{namespace}/{kind}/{name}")
        except ApiError as e:
            if e.not_found:
                return None
            # 403 right after binding: the Node authorizer's graph has not seen the pod yet. Retried.
            raise ContainerConfigError(f"cannot read {kind[:-1]} {namespace}/{name}: {e.message}") from e

    def get_secret(self, namespace: str, name: str) -> dict | None:
        return self._get("secrets", namespace, name)

    def get_configmap(self, namespace: str, name: str) -> dict | None:
        return self._get("configmaps", namespace, name)

    def service_account_token(self, pod: dict, audience: str | None, expiration_seconds: int) -> str:
        """Requested once per pod, never refreshed: kube-api-access asks for 3607 s, which the API
        server extends to a year for a pod-bound token (--service-account-extend-token-expiration)."""
        meta = pod["metadata"]
        sa = pod["spec"].get("serviceAccountName") or "default"
        spec = {
            "expirationSeconds": max(expiration_seconds, 600),
            "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": meta["name"], "uid": meta["uid"]},
        }
        if audience:
            spec["audiences"] = [audience]
        try:
            resp = self.api.create(
                f"/api/v1/namespaces/{meta['namespace']}/serviceaccounts/{sa}/token",
                {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec},
            )
        except ApiError as e:
            raise ContainerConfigError(f"cannot get a token for service account {sa}: {e.message}") from e
        return resp["status"]["token"]


class PodController:
    def __init__(self, api: KubeApi, node_name: str, provider: ProcessProvider):
        self.api = api
        self.node_name = node_name
        self.provider = provider
        self.pods: dict[str, dict] = {}  # uid -> latest object seen
        self.pushed: dict[str, dict] = {}  # uid -> last status sent
        self.deleted: set[str] = set()  # uids we deleted (finalizers may keep them visible)
        self._dirty: set[str] = set()
        self._cv = threading.Condition()
        self._stopping = threading.Event()
        self._lock = threading.RLock()

    # ---- watch ---------------------------------------------------------------------------------
    def mark_dirty(self, uid: str) -> None:
        with self._cv:
            self._dirty.add(uid)
            self._cv.notify()

    def watch_forever(self) -> None:
        selector = f"spec.nodeName={self.node_name}"
        first_list = True
        while not self._stopping.is_set():
            try:
                listing = self.api.get("/api/v1/pods", fieldSelector=selector)
                seen = set()
                for pod in listing.get("items", []):
                    seen.add(pod["metadata"]["uid"])
                    self.sync(pod)
                for uid in set(self.pods) - seen:
                    self.gone(uid)
                if first_list:
                    self.provider.collect_garbage(seen)
                    first_list = False
                rv = listing["metadata"]["resourceVersion"]
                while not self._stopping.is_set():
                    for event in self.api.watch("/api/v1/pods", rv, fieldSelector=selector):
                        obj = event["object"]
                        rv = obj["metadata"].get("resourceVersion", rv)
                        if event["type"] in ("ADDED", "MODIFIED"):
                            self.sync(obj)
                        elif event["type"] == "DELETED":
                            self.gone(obj["metadata"]["uid"])
            except ApiError as e:
                if e.status != 410:
                    log.warning("pod watch: %s", e)
                    time.sleep(2)
            except Exception as e:  # connection drops, apiserver restarts
                if not self._stopping.is_set():
                    log.warning("pod watch: %s", e)
                    time.sleep(2)

    def sync(self, pod: dict) -> None:
        uid = pod["metadata"]["uid"]
        with self._lock:
            if uid in self.deleted:
                return
            self.pods[uid] = pod
            if self.provider.knows(uid):
                self.provider.update_pod(pod)
            elif is_terminal((pod.get("status") or {}).get("phase")):
                self.provider.adopt_finished(pod)
            elif self.provider.previously_started(pod):
                log.warning(
                    "pod %s/%s was started by an earlier agent: reporting it Failed",
                    pod["metadata"]["namespace"],
                    pod["metadata"]["name"],
                )
                self.provider.adopt_lost(pod)
            else:
                log.info(
                    "pod %s/%s bound here: starting", pod["metadata"]["namespace"], pod["metadata"]["name"]
                )
                self.provider.create_pod(pod)
        self.mark_dirty(uid)

    def gone(self, uid: str) -> None:
        """The object is gone (force-deleted, or our own grace-0 delete went through)."""
        with self._lock:
            pod = self.pods.pop(uid, None)
            self.pushed.pop(uid, None)
        if pod is not None and self.provider.knows(uid) and not self.provider.is_finished(uid):
            self.provider.delete_pod(pod, grace=2)
        self.mark_dirty(uid)  # the pusher forgets it once its processes are gone

    # ---- status --------------------------------------------------------------------------------
    def push_forever(self) -> None:
        while not self._stopping.is_set():
            with self._cv:
                if not self._dirty:
                    if not self._cv.wait(RESYNC_SECONDS):
                        self._dirty.update(self.pods)
                batch, self._dirty = self._dirty, set()
            for uid in batch:
                try:
                    self.push(uid)
                except Exception as e:
                    log.warning("status of pod %s: %s", uid, e)
                    time.sleep(0.5)
                    self.mark_dirty(uid)

    def push(self, uid: str) -> None:
        with self._lock:
            pod = self.pods.get(uid)
        if pod is None:
            if self.provider.is_finished(uid):
                self.provider.forget(uid)
            elif self.provider.knows(uid):
                threading.Timer(0.5, self.mark_dirty, (uid,)).start()
            return
        finished = self.provider.is_finished(uid)  # before the status, so a final status is final
        status = self.provider.get_pod_status(uid)  # None: a terminal pod from before, left as it is
        meta = pod["metadata"]
        if status is not None and status != self.pushed.get(uid):
            try:
                updated = self.api.merge_patch(
                    pod_path(meta["namespace"], meta["name"], "status"),
                    {"metadata": {"uid": uid}, "status": status},
                )
            except ApiError as e:
                if e.not_found or e.conflict or e.status == 422:
                    return  # gone, or a new pod with the same name: the watch will say
                raise
            with self._lock:
                self.pushed[uid] = status
                if uid in self.pods:
                    self.pods[uid] = updated
            self.provider.update_pod(updated)
        if finished and meta.get("deletionTimestamp"):
            self._delete(pod)

    def _delete(self, pod: dict) -> None:
        meta = pod["metadata"]
        uid = meta["uid"]
        try:
            self.api.delete(
                pod_path(meta["namespace"], meta["name"]),
                {
                    "apiVersion": "v1",
                    "kind": "DeleteOptions",
                    "gracePeriodSeconds": 0,
                    "preconditions": {"uid": uid},
                },
            )
        except ApiError as e:
            if not (e.not_found or e.conflict):
                raise
        log.info("pod %s/%s: processes gone, object deleted", meta["namespace"], meta["name"])
        with self._lock:
            self.deleted.add(uid)
            self.pods.pop(uid, None)
            self.pushed.pop(uid, None)
        self.provider.forget(uid)

    # ---- shutdown ------------------------------------------------------------------------------
    def shutdown(self, grace: float) -> None:
        """Node shutdown: stop every pod, report them Failed (as kubelet's graceful shutdown does)."""
        self.provider.shutdown(grace, NODE_SHUTDOWN)
        self._stopping.set()
        for uid in list(self.pods):
            try:
                self.push(uid)
            except Exception as e:
                log.warning("final status of pod %s: %s", uid, e)
