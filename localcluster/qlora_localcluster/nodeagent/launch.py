"""From a container spec to what the process runtime starts: argv, environment, working directory.

Processes share the host's filesystem, so container paths are mapped to host paths by one rule:

    Every volumeMount's mountPath, and the container's terminationMessagePath, is replaced by its
    host location wherever it occurs as a whole path in an argv element, an env value or workingDir:
    at the start of the string or after a character that cannot be part of a path (space, `=`,
    `:`, quote, ...), and followed by `/`, the end of the string or such a character. The longest
    mountPath wins. `--config=/etc/qlora/job.yaml` and `cat /etc/qlora/job.yaml` are rewritten;
    `/etc/qlora2`, `s3://b/etc/qlora` and relative paths are not. Other absolute paths are left
    alone and mean the host's files (there is no image filesystem), except workingDir: outside
    every mount it becomes `<pod dir>/rootfs/<workingDir>`. HOME is the pod directory.

The mapping is also exported to the process: NODEAGENT_PATH_MAP (JSON {container path: host
path}), NODEAGENT_POD_DIR and NODEAGENT_TERMINATION_MESSAGE_PATH, so programs that build paths at
run time can translate them.

There is no DNS either, and every pod's IP is 127.0.0.1, so the one kind of name pods need to find
each other, a pod's stable name behind its headless Service (`<hostname>.<subdomain>`, optionally
followed by `.<namespace>`, `.svc` and `.cluster.local`), is rewritten to 127.0.0.1 by the same rule
wherever it occurs as a whole host name in an argv element or an env value, for the names of the
pod's own subdomain in its own namespace (where a data-parallel group's rendezvous address lives).
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from .image_table import ImageTable
from .in_cluster import write_kubeconfig

DEFAULT_TERMINATION_MESSAGE_PATH = "/dev/termination-log"
_PATH_CHAR = r"A-Za-z0-9_.\-"


class ContainerConfigError(Exception):
    """Reported like kubelet does: container waiting, reason CreateContainerConfigError."""


class ResourceReader(Protocol):
    def get_secret(self, namespace: str, name: str) -> dict | None: ...
    def get_configmap(self, namespace: str, name: str) -> dict | None: ...


@dataclass
class ContainerLaunch:
    name: str
    argv: list[str]
    env: dict[str, str]
    cwd: str
    termination_message_host_path: str
    image_id: str


class PathMap:
    def __init__(self, mapping: dict[str, str]):
        self.mapping = {k.rstrip("/") or "/": v for k, v in mapping.items() if k.rstrip("/")}
        keys = sorted(self.mapping, key=len, reverse=True)
        self._re = None
        if keys:
            alternatives = "|".join(re.escape(k) for k in keys)
            self._re = re.compile(rf"(?<![{_PATH_CHAR}/~])({alternatives})(?=/|$|[^{_PATH_CHAR}])")

    def rewrite(self, text: str) -> str:
        if not self._re:
            return text
        return self._re.sub(lambda m: self.mapping[m.group(1)], text)


class ServiceNames:
    """`<hostname>.<subdomain>[.<namespace>[.svc[.cluster.local]]]` -> 127.0.0.1 for the pod's own
    subdomain: what a headless Service's DNS records would resolve to on this one-address node."""

    def __init__(self, subdomain: str | None, namespace: str):
        self._re = None
        if subdomain:
            domain = re.escape(subdomain) + rf"(?:\.{re.escape(namespace)}(?:\.svc(?:\.cluster\.local)?)?)?"
            self._re = re.compile(rf"(?<![A-Za-z0-9.\-])[a-z0-9](?:[-a-z0-9]*[a-z0-9])?\.{domain}(?![A-Za-z0-9.\-])")

    def rewrite(self, text: str) -> str:
        return self._re.sub("127.0.0.1", text) if self._re else text


def expand_refs(text: str, env: dict[str, str]) -> str:
    """Kubernetes $(VAR) expansion: $(NAME) -> value when defined, $$ -> $, anything else as is."""
    out, i = [], 0
    while i < len(text):
        if text.startswith("$$", i):
            out.append("$")
            i += 2
        elif text.startswith("$(", i):
            end = text.find(")", i + 2)
            if end == -1:
                out.append(text[i:])
                break
            name = text[i + 2 : end]
            out.append(env[name] if name in env else text[i : end + 1])
            i = end + 1
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def field_ref(pod: dict, field_path: str) -> str:
    meta, spec, status = pod.get("metadata", {}), pod.get("spec", {}), pod.get("status", {})
    m = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", field_path)
    if m:
        return meta.get(m.group(1), {}).get(m.group(2), "")
    simple = {
        "metadata.name": meta.get("name", ""),
        "metadata.namespace": meta.get("namespace", ""),
        "metadata.uid": meta.get("uid", ""),
        "spec.nodeName": spec.get("nodeName", ""),
        "spec.serviceAccountName": spec.get("serviceAccountName", ""),
        "status.podIP": status.get("podIP") or "127.0.0.1",
        "status.podIPs": status.get("podIP") or "127.0.0.1",
        "status.hostIP": status.get("hostIP") or "127.0.0.1",
        "status.hostIPs": status.get("hostIP") or "127.0.0.1",
    }
    if field_path not in simple:
        raise ContainerConfigError(f"unsupported fieldRef fieldPath {field_path!r}")
    return simple[field_path]


def _quantity(value: str) -> float:
    from .quantity import parse_quantity

    return parse_quantity(value)


def resource_field_ref(container: dict, ref: dict) -> str:
    kind, _, res = ref["resource"].partition(".")
    resources = container.get("resources", {})
    value = resources.get(kind, {}).get(res)
    if value is None and kind == "requests":
        value = resources.get("limits", {}).get(res)
    if value is None:
        value = str(os.cpu_count() or 1) if res == "cpu" else "0"
    divisor = _quantity(ref.get("divisor", "1"))
    number = _quantity(str(value)) / (divisor or 1)
    return str(int(-(-number // 1)))  # kubelet rounds up


def _key_of(obj: dict | None, key: str, kind: str, name: str, optional: bool, decode: bool) -> str | None:
    if obj is None:
        if optional:
            return None
        raise ContainerConfigError(f'{kind} "{name}" not found')
    data = obj.get("data") or {}
    if key not in data:
        if not decode and key in (obj.get("binaryData") or {}):
            data = obj["binaryData"]
        elif optional:
            return None
        else:
            raise ContainerConfigError(
                f"couldn't find key {key} in {kind} {obj['metadata']['namespace']}/{name}"
            )
    value = data[key]
    if decode:
        import base64

        return base64.b64decode(value).decode("utf-8", errors="replace")
    return value


def resolve_env(pod: dict, container: dict, reader: ResourceReader) -> dict[str, str]:
    """envFrom first, then env in order, each value expanded against what came before (kubelet order)."""
    ns = pod["metadata"]["namespace"]
    env: dict[str, str] = {}
    for source in container.get("envFrom") or []:
        prefix = source.get("prefix", "")
        for kind, ref_key, getter, decode in (
            ("configmap", "configMapRef", reader.get_configmap, False),
            ("secret", "secretRef", reader.get_secret, True),
        ):
            ref = source.get(ref_key)
            if not ref:
                continue
            obj = getter(ns, ref["name"])
            if obj is None:
                if ref.get("optional"):
                    continue
                raise ContainerConfigError(f'{kind} "{ref["name"]}" not found')
            for key in obj.get("data") or {}:
                env[prefix + key] = _key_of(obj, key, kind, ref["name"], False, decode)
    for var in container.get("env") or []:
        name = var["name"]
        if "valueFrom" not in var:
            env[name] = expand_refs(var.get("value", ""), env)
            continue
        vf = var["valueFrom"]
        if "secretKeyRef" in vf:
            ref = vf["secretKeyRef"]
            value = _key_of(
                reader.get_secret(ns, ref["name"]),
                ref["key"],
                "secret",
                ref["name"],
                bool(ref.get("optional")),
                True,
            )
        elif "configMapKeyRef" in vf:
            ref = vf["configMapKeyRef"]
            value = _key_of(
                reader.get_configmap(ns, ref["name"]),
                ref["key"],
                "configmap",
                ref["name"],
                bool(ref.get("optional")),
                False,
            )
        elif "fieldRef" in vf:
            value = field_ref(pod, vf["fieldRef"]["fieldPath"])
        elif "resourceFieldRef" in vf:
            value = resource_field_ref(container, vf["resourceFieldRef"])
        else:
            raise ContainerConfigError(f"unsupported valueFrom for env {name}: {sorted(vf)}")
        if value is not None:
            env[name] = value
    return env


def base_env(pod_dir: Path, pass_env: list[str], environ: dict[str, str] | None = None) -> dict[str, str]:
    """What every container starts from: no agent secrets leak in unless passed by name."""
    environ = os.environ if environ is None else environ
    venv_bin = str(Path(sys.executable).parent)
    path = environ.get("PATH", "/usr/local/bin:/usr/bin:/bin")
    env = {
        "PATH": path if path.split(":")[0] == venv_bin else f"{venv_bin}:{path}",
        "HOME": str(pod_dir),
        "LANG": environ.get("LANG", "C.UTF-8"),
    }
    for name in ("VIRTUAL_ENV", "PYTHONPATH", *pass_env):
        if name in environ:
            env[name] = environ[name]
    return env


def container_path_map(
    container: dict, volume_host_paths: dict[str, str], container_dir: Path, env: dict[str, str]
) -> tuple[dict[str, str], str]:
    """({container path: host path}, host termination-message file) for one container."""
    mapping: dict[str, str] = {}
    for mount in container.get("volumeMounts") or []:
        host = volume_host_paths.get(mount["name"])
        if host is None:
            raise ContainerConfigError(f'volumeMount "{mount["name"]}" refers to no volume of the pod')
        sub = mount.get("subPath") or expand_refs(mount.get("subPathExpr", ""), env)
        if sub:
            if sub.startswith("/") or ".." in Path(sub).parts:
                raise ContainerConfigError(f"subPath {sub!r} must be a relative path inside the volume")
            host = os.path.join(host, sub)
            if not os.path.exists(host):
                os.makedirs(host, exist_ok=True)
        mapping[mount["mountPath"]] = host
    term = container.get("terminationMessagePath") or DEFAULT_TERMINATION_MESSAGE_PATH
    term_host = str(container_dir / "termination-log")
    mapping[term] = term_host
    return mapping, term_host


def working_dir(requested: str | None, paths: PathMap, pod_dir: Path) -> str:
    """Inside a volumeMount: mapped like any path. Anywhere else: the same path under
    `<pod dir>/rootfs`, the container's private filesystem, never the host's own directory."""
    if not requested:
        return str(pod_dir)
    mapped = paths.rewrite(requested)
    if mapped != requested:
        return mapped
    return str(pod_dir / "rootfs") + "/" + requested.lstrip("/")


def build_launch(
    pod: dict,
    container: dict,
    *,
    images: ImageTable,
    reader: ResourceReader,
    pod_dir: Path,
    volume_host_paths: dict[str, str],
    pass_env: list[str],
    api_server: str = "",
) -> ContainerLaunch:
    name = container["name"]
    container_dir = pod_dir / "containers" / name
    container_dir.mkdir(parents=True, exist_ok=True)
    entry = images.lookup(container.get("image", ""))  # ImageNotInTable -> ErrImagePull
    pod_env = resolve_env(pod, container, reader)
    mapping, term_host = container_path_map(container, volume_host_paths, container_dir, pod_env)
    paths = PathMap(mapping)
    names = ServiceNames((pod.get("spec") or {}).get("subdomain"), pod["metadata"].get("namespace", "default"))
    env = base_env(pod_dir, pass_env)
    # A kubelet names the pod's host spec.hostname when set (an Indexed Job's `<job>-<index>`).
    env["HOSTNAME"] = (pod.get("spec") or {}).get("hostname") or pod["metadata"]["name"]
    kubeconfig = write_kubeconfig(pod, container, mapping, api_server, container_dir / "kubeconfig")
    if kubeconfig:  # in_cluster.py: the stand-in for in-cluster config; the container's own wins
        env["KUBECONFIG"] = kubeconfig
    env.update({k: names.rewrite(paths.rewrite(v)) for k, v in pod_env.items()})
    env["NODEAGENT_PATH_MAP"] = json.dumps(mapping, sort_keys=True)
    env["NODEAGENT_POD_DIR"] = str(pod_dir)
    env["NODEAGENT_TERMINATION_MESSAGE_PATH"] = term_host
    from_image, from_pod = images.argv_parts(container.get("image", ""), container.get("command"),
                                             container.get("args"))
    argv = from_image + [names.rewrite(paths.rewrite(expand_refs(a, pod_env))) for a in from_pod]
    cwd = working_dir(container.get("workingDir"), paths, pod_dir)
    os.makedirs(cwd, exist_ok=True)  # a runtime creates a missing workingDir too
    return ContainerLaunch(name, argv, env, cwd, term_host, entry.image_id)
