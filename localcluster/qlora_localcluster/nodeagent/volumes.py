"""Pod volumes materialised as directories under `<pod dir>/volumes/<type>/<name>/`.

Supported: configMap, secret (keys or `items` as files, defaultMode/mode), emptyDir (an empty
directory; medium and sizeLimit are ignored), downwardAPI (fieldRef items), projected (configMap,
secret, downwardAPI and serviceAccountToken sources; the token comes from the TokenRequest API,
bound to the pod) and hostPath (the host directory itself: there is no mount namespace). Any other
type fails the mount, as an unavailable volume plugin would.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import Protocol

from .launch import ContainerConfigError, field_ref


class VolumeError(Exception):
    """The pod cannot start yet (kubelet: FailedMount, containers wait in ContainerCreating)."""


class VolumeSourceReader(Protocol):
    def get_secret(self, namespace: str, name: str) -> dict | None: ...
    def get_configmap(self, namespace: str, name: str) -> dict | None: ...
    def service_account_token(self, pod: dict, audience: str | None, expiration_seconds: int) -> str: ...


def _write_file(root: Path, rel: str, content: bytes, mode: int | None) -> None:
    if rel.startswith("/") or ".." in Path(rel).parts:
        raise VolumeError(f"item path {rel!r} must be relative and stay inside the volume")
    target = root / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_bytes(content)
    os.chmod(tmp, mode if mode is not None else 0o644)
    os.replace(tmp, target)


def _key_files(obj: dict, decode: bool) -> dict[str, bytes]:
    files = {}
    for key, value in (obj.get("data") or {}).items():
        files[key] = base64.b64decode(value) if decode else value.encode()
    for key, value in (obj.get("binaryData") or {}).items():
        files[key] = base64.b64decode(value)
    return files


def _project_keys(
    root: Path,
    kind: str,
    name: str,
    obj: dict | None,
    decode: bool,
    items: list | None,
    default_mode: int | None,
    optional: bool,
) -> None:
    if obj is None:
        if optional:
            return
        raise VolumeError(f'{kind} "{name}" not found')
    files = _key_files(obj, decode)
    if not items:
        for key, content in files.items():
            _write_file(root, key, content, default_mode)
        return
    for item in items:
        if item["key"] not in files:
            if optional:
                continue
            raise VolumeError(f'configmap/secret "{name}" has no key "{item["key"]}"')
        _write_file(root, item["path"], files[item["key"]], item.get("mode", default_mode))


def _downward_items(root: Path, pod: dict, items: list, default_mode: int | None) -> None:
    for item in items or []:
        if "fieldRef" not in item:
            raise VolumeError(f"downwardAPI item {item.get('path')!r}: only fieldRef is supported")
        path = item["fieldRef"]["fieldPath"]
        if path in ("metadata.labels", "metadata.annotations"):
            values = pod["metadata"].get(path.split(".")[1], {})
            text = "\n".join(f'{k}="{v}"' for k, v in sorted(values.items()))
        else:
            try:
                text = field_ref(pod, path)
            except ContainerConfigError as e:
                raise VolumeError(str(e)) from e
        _write_file(root, item["path"], text.encode(), item.get("mode", default_mode))


def materialize(pod: dict, pod_dir: Path, reader: VolumeSourceReader) -> dict[str, str]:
    """Creates or refreshes every volume; returns {volume name: host directory}."""
    ns = pod["metadata"]["namespace"]
    paths: dict[str, str] = {}
    for vol in pod["spec"].get("volumes") or []:
        name = vol["name"]
        kind = next((k for k in vol if k != "name"), "")
        if kind == "hostPath":
            host = Path(vol["hostPath"]["path"])
            if vol["hostPath"].get("type") in ("DirectoryOrCreate",) and not host.exists():
                host.mkdir(parents=True, exist_ok=True)
            paths[name] = str(host)
            continue
        root = pod_dir / "volumes" / kind / name
        root.mkdir(parents=True, exist_ok=True)
        src = vol[kind] or {}
        if kind == "emptyDir":
            pass
        elif kind == "configMap":
            _project_keys(
                root,
                "configmap",
                src["name"],
                reader.get_configmap(ns, src["name"]),
                False,
                src.get("items"),
                src.get("defaultMode"),
                bool(src.get("optional")),
            )
        elif kind == "secret":
            _project_keys(
                root,
                "secret",
                src["secretName"],
                reader.get_secret(ns, src["secretName"]),
                True,
                src.get("items"),
                src.get("defaultMode"),
                bool(src.get("optional")),
            )
        elif kind == "downwardAPI":
            _downward_items(root, pod, src.get("items"), src.get("defaultMode"))
        elif kind == "projected":
            mode = src.get("defaultMode")
            for source in src.get("sources") or []:
                if "configMap" in source:
                    s = source["configMap"]
                    _project_keys(
                        root,
                        "configmap",
                        s["name"],
                        reader.get_configmap(ns, s["name"]),
                        False,
                        s.get("items"),
                        mode,
                        bool(s.get("optional")),
                    )
                elif "secret" in source:
                    s = source["secret"]
                    _project_keys(
                        root,
                        "secret",
                        s["name"],
                        reader.get_secret(ns, s["name"]),
                        True,
                        s.get("items"),
                        mode,
                        bool(s.get("optional")),
                    )
                elif "downwardAPI" in source:
                    _downward_items(root, pod, source["downwardAPI"].get("items"), mode)
                elif "serviceAccountToken" in source:
                    s = source["serviceAccountToken"]
                    token = reader.service_account_token(
                        pod, s.get("audience"), int(s.get("expirationSeconds", 3607))
                    )
                    _write_file(root, s["path"], token.encode(), mode)
                else:
                    raise VolumeError(f"projected volume {name}: unsupported source {sorted(source)}")
        else:
            raise VolumeError(f'volume "{name}": type {kind or "?"} is not supported by the node agent')
        paths[name] = str(root)
    return paths
