"""An in-memory stand-in for qlora_operator.kube.Kube, for reconcile tests without a server.

It keeps objects the way the API server would (uids, resourceVersions, 409 on a second create,
409 on a status patch from a stale read) and records every write, so a test can assert that a
second reconcile wrote nothing. Kubernetes' own controllers are played by the test, by editing
`objects` between reconciles.
"""

import copy
import dataclasses
import itertools
from dataclasses import dataclass, field

from qlora_operator import timestamps
from qlora_operator.kube import Conflict
from qlora_operator.observation import Observed, Snapshot, group_children, latest_progress, pod_to_tail
from qlora_operator.planning import Create, Patch
from qlora_operator.resource import merge_patch


def _apply_merge_patch(target: dict, patch: dict) -> None:
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            _apply_merge_patch(target[key], value)
        else:
            target[key] = copy.deepcopy(value)


@dataclass
class FakeKube:
    qlorajobs: dict[str, dict] = field(default_factory=dict)  # name -> body
    objects: dict[tuple[str, str], dict] = field(default_factory=dict)  # (kind, name) -> object
    logs: dict[str, str] = field(default_factory=dict)  # pod name -> log text
    writes: list[tuple] = field(default_factory=list)
    events: list = field(default_factory=list)
    stale_reads: int = 0  # serve this many reads with an outdated resourceVersion
    reads: list[str] = field(default_factory=list)  # "get", "observe", "snapshot", "log": what a reconcile cost
    _rv: itertools.count = field(default_factory=lambda: itertools.count(1000))

    def add_qlorajob(self, body: dict) -> None:
        self.qlorajobs[body["metadata"]["name"]] = copy.deepcopy(body)

    def get_qlorajob(self, namespace: str, name: str) -> dict | None:
        self.reads.append("get")
        body = copy.deepcopy(self.qlorajobs.get(name))
        if body is not None and self.stale_reads:
            self.stale_reads -= 1
            body["metadata"]["resourceVersion"] = "stale"
        return body

    def observe(self, job, now, log_tail_lines, with_pods=True) -> Observed:
        self.reads.append("observe")
        kinds = {"ConfigMap": [], "Job": [], "Pod": []}
        for (kind, _), obj in self.objects.items():
            if kind == "Job" or with_pods:
                kinds[kind].append(copy.deepcopy(obj))
        observed = group_children(job.uid, now, kinds["ConfigMap"], kinds["Job"], kinds["Pod"])
        return self.with_progress(job.namespace, observed, log_tail_lines) if with_pods else observed

    def with_progress(self, namespace, observed, log_tail_lines) -> Observed:
        pod = pod_to_tail(observed)
        if pod is None:
            return observed
        self.reads.append("log")
        text = self.logs.get(pod["metadata"]["name"])
        return dataclasses.replace(observed, progress=latest_progress(text) if text else None)

    def snapshot(self, namespaces) -> Snapshot:
        self.reads.append("snapshot")
        kinds = {"ConfigMap": [], "Job": [], "Pod": []}
        for (kind, _), obj in self.objects.items():
            kinds.setdefault(kind, []).append(copy.deepcopy(obj))
        return Snapshot([copy.deepcopy(b) for b in self.qlorajobs.values()], kinds["ConfigMap"], kinds["Job"],
                        kinds["Pod"])

    def apply(self, namespace: str, action) -> bool:
        key = (action.kind, action.name)
        if isinstance(action, Create):
            if key in self.objects:
                return False
            obj = copy.deepcopy(action.obj)
            obj["metadata"].update(uid=f"uid-{action.kind}-{action.name}", resourceVersion=str(next(self._rv)),
                                   creationTimestamp=timestamps.format(timestamps.now()))
            self.objects[key] = obj
        elif isinstance(action, Patch):
            if key not in self.objects:
                return False
            _apply_merge_patch(self.objects[key], action.patch)
            self.objects[key]["metadata"]["resourceVersion"] = str(next(self._rv))  # as every write does
        self.writes.append((type(action).__name__, action.kind, action.name))
        return True

    def patch_status(self, job, status) -> None:
        body = self.qlorajobs[job.name]
        if body["metadata"]["resourceVersion"] != job.resource_version:
            raise Conflict(f"{job.key} changed")
        current = body.get("status") or {}
        _apply_merge_patch(body.setdefault("status", {}), merge_patch(job.status.to_wire(), status.to_wire()))
        del current
        body["metadata"]["resourceVersion"] = str(next(self._rv))
        self.writes.append(("PatchStatus", "QLoRAJob", job.name))

    def post_event(self, job, event, now) -> None:
        self.events.append(event)
