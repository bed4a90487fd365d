"""A small dict-in, dict-out client for the few API calls a node agent makes.

The kubeconfig is parsed by the `kubernetes` package (every kubeconfig form it knows works); the
calls themselves are plain HTTPS with `requests`, because the agent needs exactly what a kubelet
sends: JSON merge patches on `pods/status` and `nodes/status`, deletes with preconditions, and
watches it can restart from a resourceVersion. Objects stay plain dicts end to end.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import requests

log = logging.getLogger(__name__)

MERGE_PATCH = "application/merge-patch+json"


class ApiError(Exception):
    def __init__(self, status: int, body: str, method: str, path: str):
        self.status = status
        self.body = body
        try:
            self.reason = json.loads(body).get("reason", "")
            self.message = json.loads(body).get("message", body)
        except (ValueError, AttributeError):
            self.reason, self.message = "", body
        super().__init__(f"{method} {path}: HTTP {status}: {self.message}")

    @property
    def not_found(self) -> bool:
        return self.status == 404

    @property
    def conflict(self) -> bool:
        return self.status == 409


@dataclass(frozen=True)
class Credentials:
    server: str
    ca_file: str | None
    cert_file: str | None
    key_file: str | None
    token: str | None = None

    @classmethod
    def from_kubeconfig(cls, path: str, context: str | None = None) -> Credentials:
        from kubernetes import client, config

        cfg = client.Configuration()
        config.load_kube_config(config_file=path, context=context, client_configuration=cfg)
        token = None
        auth = (cfg.api_key or {}).get("authorization") or (cfg.api_key or {}).get("BearerToken")
        if auth:
            token = auth.removeprefix("Bearer ").strip()
        return cls(cfg.host, cfg.ssl_ca_cert, cfg.cert_file, cfg.key_file, token)


class KubeApi:
    """Thread-safe enough for the agent: one requests.Session per thread."""

    def __init__(self, creds: Credentials, timeout: float = 30.0):
        self.creds = creds
        self.timeout = timeout
        self._local = threading.local()

    def _session(self) -> requests.Session:
        s = getattr(self._local, "session", None)
        if s is None:
            s = requests.Session()
            # The environment (REQUESTS_CA_BUNDLE, proxies) must not override the kubeconfig's CA:
            # requests lets REQUESTS_CA_BUNDLE win over Session.verify.
            s.trust_env = False
            s.verify = self.creds.ca_file or True
            if self.creds.cert_file:
                s.cert = (self.creds.cert_file, self.creds.key_file)
            if self.creds.token:
                s.headers["Authorization"] = f"Bearer {self.creds.token}"
            s.headers["User-Agent"] = "qlora-nodeagent/0.1"
            self._local.session = s
        return s

    def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        params: dict | None = None,
        content_type: str = "application/json",
        timeout: float | None = None,
    ) -> dict:
        data = None if body is None else json.dumps(body)
        headers = {"Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = content_type
        resp = self._session().request(
            method,
            self.creds.server + path,
            data=data,
            params=params,
            headers=headers,
            timeout=timeout or self.timeout,
        )
        if resp.status_code >= 400:
            raise ApiError(resp.status_code, resp.text, method, path)
        return resp.json() if resp.content else {}

    def get(self, path: str, **params) -> dict:
        return self.request("GET", path, params=params or None)

    def create(self, path: str, body: dict) -> dict:
        return self.request("POST", path, body=body)

    def replace(self, path: str, body: dict) -> dict:
        return self.request("PUT", path, body=body)

    def merge_patch(self, path: str, patch: dict) -> dict:
        return self.request("PATCH", path, body=patch, content_type=MERGE_PATCH)

    def delete(self, path: str, body: dict | None = None) -> dict:
        return self.request("DELETE", path, body=body)

    def watch(self, path: str, resource_version: str, timeout_seconds: int = 300, **params) -> Iterator[dict]:
        """Yields watch events ({type, object}) until the server closes the stream.

        Raises ApiError(410) when the resourceVersion is too old (the caller re-lists).
        """
        query = {
            "watch": "1",
            "resourceVersion": resource_version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(timeout_seconds),
            **params,
        }
        resp = self._session().get(
            self.creds.server + path, params=query, stream=True, timeout=(10, timeout_seconds + 30)
        )
        try:
            if resp.status_code >= 400:
                raise ApiError(resp.status_code, resp.text, "WATCH", path)
            for line in resp.iter_lines():
                if not line:
                    continue
                event = json.loads(line)
                if event.get("type") == "ERROR":
                    status = event.get("object", {})
                    raise ApiError(status.get("code", 500), json.dumps(status), "WATCH", path)
                yield event
        finally:
            resp.close()


def pod_path(namespace: str, name: str, sub: str = "") -> str:
    return f"/api/v1/namespaces/{namespace}/pods/{name}" + (f"/{sub}" if sub else "")
