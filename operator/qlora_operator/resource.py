"""The QLoRAJob custom resource as the operator reads it: identity, the validated spec, the status."""

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

from pydantic import ValidationError
from qlora_api import API_VERSION, KIND, QLoRAJobSpec, QLoRAJobStatus

from qlora_operator import timestamps


@dataclass(frozen=True)
class QLoRAJob:
    name: str
    namespace: str
    uid: str
    generation: int
    resource_version: str
    created: datetime
    spec: QLoRAJobSpec | None  # None when the operator's models refuse what the API server took
    spec_error: str | None
    status: QLoRAJobStatus
    labels: Mapping[str, str] = field(default_factory=dict)  # metadata.labels (Kueue's queue name, ...)

    @classmethod
    def from_body(cls, body: Mapping) -> "QLoRAJob":
        meta = body["metadata"]
        try:
            spec, spec_error = QLoRAJobSpec.model_validate(body.get("spec") or {}), None
        except ValidationError as e:
            spec, spec_error = None, _one_line(e)
        return cls(
            name=meta["name"],
            namespace=meta["namespace"],
            uid=meta["uid"],
            generation=int(meta.get("generation") or 1),
            resource_version=str(meta.get("resourceVersion", "")),
            created=timestamps.parse(meta.get("creationTimestamp")) or timestamps.now(),
            spec=spec,
            spec_error=spec_error,
            status=parse_status(body.get("status")),
            labels=dict(meta.get("labels") or {}),
        )

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def owner_reference(self) -> dict:
        """Makes the QLoRAJob the controller of a child, so the garbage collector removes it with the job."""
        return {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }

    def object_reference(self) -> dict:
        return {"apiVersion": API_VERSION, "kind": KIND, "name": self.name, "namespace": self.namespace,
                "uid": self.uid, "resourceVersion": self.resource_version}


def parse_status(raw: Mapping | None) -> QLoRAJobStatus:
    """The stored status; timestamps are normalised to whole seconds so equality means no change."""
    status = QLoRAJobStatus.model_validate(dict(raw or {}))
    return normalise(status)


def normalise(status: QLoRAJobStatus) -> QLoRAJobStatus:
    for cond in status.conditions:
        cond.last_transition_time = timestamps.parse(cond.last_transition_time)
    status.start_time = timestamps.parse(status.start_time)
    status.completion_time = timestamps.parse(status.completion_time)
    if status.progress is not None and status.progress.updated_at is not None:
        status.progress.updated_at = timestamps.parse(status.progress.updated_at)
    return status


def owned_by(obj: Mapping, uid: str) -> bool:
    return any(ref.get("uid") == uid and ref.get("controller")
               for ref in obj.get("metadata", {}).get("ownerReferences") or [])


def _one_line(error: ValidationError) -> str:
    return "; ".join(f"spec.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in error.errors())[:1024]


def merge_patch(old: Mapping, new: Mapping) -> dict:
    """The JSON merge patch (RFC 7386) that turns `old` into `new`: changed keys, nulls for removed ones."""
    patch: dict = {}
    for key in old.keys() - new.keys():
        patch[key] = None
    for key, value in new.items():
        before = old.get(key)
        if isinstance(value, Mapping) and isinstance(before, Mapping):
            nested = merge_patch(before, value)
            if nested:
                patch[key] = nested
        elif before != value:
            patch[key] = value
    return patch
