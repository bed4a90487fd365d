"""In-cluster credentials without a mount namespace: a kubeconfig instead of the fixed path.

Client libraries find a pod's identity at `/var/run/secrets/kubernetes.io/serviceaccount/{token,
ca.crt,namespace}` and the API server at $KUBERNETES_SERVICE_HOST. Here neither exists: the
ServiceAccount admission plugin's `kube-api-access-*` projected volume is a directory under the pod
directory, and the `kubernetes` Service has no reachable endpoints. So for a container that mounts
a projected volume with a serviceAccountToken source at that path, the agent writes a kubeconfig
next to the container's other files:

    server                 the API server this agent talks to
    certificate-authority  the volume's ca.crt (the kube-root-ca.crt ConfigMap)
    tokenFile              the volume's token (bound to the pod, requested through TokenRequest)
    namespace              the pod's namespace

and sets KUBECONFIG to it unless the container sets KUBECONFIG itself. Every loader that falls back
from in-cluster config to $KUBECONFIG (client-go, kubectl, the `kubernetes` Python package) then
authenticates as the pod's ServiceAccount, as it would in a real pod. This is a deliberate
difference from a kubelet, documented in README.md.
"""

from __future__ import annotations

from pathlib import Path

import yaml

SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


def token_volume_dir(pod: dict, container: dict, path_map: dict[str, str]) -> str | None:
    """Host directory of the projected token volume the container mounts at SERVICE_ACCOUNT_DIR."""
    mount = next(
        (m for m in container.get("volumeMounts") or [] if m["mountPath"].rstrip("/") == SERVICE_ACCOUNT_DIR),
        None,
    )
    if mount is None or mount.get("subPath") or mount.get("subPathExpr"):
        return None
    volume = next((v for v in pod["spec"].get("volumes") or [] if v["name"] == mount["name"]), None)
    sources = ((volume or {}).get("projected") or {}).get("sources") or []
    if not any("serviceAccountToken" in s for s in sources):
        return None
    return path_map.get(mount["mountPath"])


def service_account_kubeconfig(pod: dict, volume_dir: str, api_server: str) -> dict:
    meta = pod["metadata"]
    account = pod["spec"].get("serviceAccountName") or "default"
    user = f"system:serviceaccount:{meta['namespace']}:{account}"
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "in-cluster",
                "cluster": {"server": api_server, "certificate-authority": f"{volume_dir}/ca.crt"},
            }
        ],
        # tokenFile, not the token itself: clients that re-read it (client-go does) see a new one.
        "users": [{"name": user, "user": {"tokenFile": f"{volume_dir}/token"}}],
        "contexts": [
            {
                "name": "in-cluster",
                "context": {"cluster": "in-cluster", "user": user, "namespace": meta["namespace"]},
            }
        ],
        "current-context": "in-cluster",
    }


def write_kubeconfig(
    pod: dict, container: dict, path_map: dict[str, str], api_server: str, target: Path
) -> str | None:
    """Writes the kubeconfig to `target` if the container mounts a token volume; returns its path."""
    volume_dir = token_volume_dir(pod, container, path_map)
    if not api_server or volume_dir is None:
        return None
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(yaml.safe_dump(service_account_kubeconfig(pod, volume_dir, api_server), sort_keys=False))
    tmp.chmod(0o600)
    tmp.replace(target)
    return str(target)
