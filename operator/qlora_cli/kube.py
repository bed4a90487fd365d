"""The user's cluster session: kubeconfig, context and namespace resolved the way kubectl does,
and the few API calls the commands make on QLoRAJobs, their Events and their trainer pods."""

import json
from dataclasses import dataclass

import click
from qlora_api.meta import GROUP, KIND, PLURAL, VERSION

DEFAULT_NAMESPACE = "default"


@dataclass
class KubeOptions:
    kubeconfig: str | None = None
    context: str | None = None
    namespace: str | None = None

    def merged(self, other: "KubeOptions") -> "KubeOptions":
        """Options given after the subcommand win over those given before it."""
        return KubeOptions(other.kubeconfig or self.kubeconfig, other.context or self.context,
                           other.namespace or self.namespace)


class ApiFailure(click.ClickException):
    """An API server refusal, shown as kubectl would: its message, then each cause with its field."""

    exit_code = 1

    @classmethod
    def from_exception(cls, exc, what: str) -> "ApiFailure":
        try:
            body = json.loads(exc.body)
        except (TypeError, ValueError):
            return cls(f"{what}: {exc.status} {exc.reason}")
        lines = [f"{what}: {body.get('message') or exc.reason}"]
        for cause in (body.get("details") or {}).get("causes") or []:
            field = cause.get("field") or "(object)"
            lines.append(f"  {field}: {cause.get('message', '')}")
        return cls("\n".join(lines))


class KubeSession:
    """Clients bound to one kubeconfig context, and the namespace every command works in."""

    def __init__(self, options: KubeOptions):
        from kubernetes import client, config

        try:
            contexts, active = config.list_kube_config_contexts(config_file=options.kubeconfig)
            self.api_client = config.new_client_from_config(config_file=options.kubeconfig, context=options.context)
        except (config.ConfigException, OSError) as exc:
            raise click.ClickException(f"no usable kubeconfig: {exc}") from exc
        chosen = next((c for c in contexts if c["name"] == options.context), None) if options.context else active
        if chosen is None:
            raise click.ClickException(f"context {options.context!r} is not in the kubeconfig")
        self.context = chosen["name"]
        self.namespace = options.namespace or chosen.get("context", {}).get("namespace") or DEFAULT_NAMESPACE
        self.custom = client.CustomObjectsApi(self.api_client)
        self.core = client.CoreV1Api(self.api_client)
        self.ApiException = client.ApiException

    # --- QLoRAJobs ---------------------------------------------------------------------------
    def get_job(self, name: str) -> dict:
        try:
            return self.custom.get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name)
        except self.ApiException as exc:
            if exc.status == 404:
                raise click.ClickException(f"{KIND} {name!r} not found in namespace {self.namespace!r}") from exc
            raise ApiFailure.from_exception(exc, f"reading {KIND} {name}") from exc

    def list_jobs(self) -> list[dict]:
        try:
            return self.custom.list_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL)["items"]
        except self.ApiException as exc:
            raise ApiFailure.from_exception(exc, f"listing {PLURAL}") from exc

    def create_job(self, manifest: dict, server_dry_run: bool = False) -> dict:
        kwargs = {"dry_run": "All"} if server_dry_run else {}
        namespace = manifest.get("metadata", {}).get("namespace") or self.namespace
        try:
            return self.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, manifest, **kwargs)
        except self.ApiException as exc:
            name = manifest.get("metadata", {}).get("name", "")
            raise ApiFailure.from_exception(exc, f"the API server refused {KIND} {name}") from exc

    # --- what happened around a job ------------------------------------------------------------
    def events_of(self, name: str) -> list[dict]:
        selector = f"involvedObject.kind={KIND},involvedObject.name={name}"
        try:
            events = self.core.list_namespaced_event(self.namespace, field_selector=selector)
        except self.ApiException as exc:
            raise ApiFailure.from_exception(exc, "listing events") from exc
        return [self.api_client.sanitize_for_serialization(e) for e in events.items]

    def pods_of_job(self, job_name: str) -> list[dict]:
        """The pods of one trainer Job (batch/v1 labels them job-name=<Job>), newest first."""
        try:
            pods = self.core.list_namespaced_pod(self.namespace, label_selector=f"job-name={job_name}")
        except self.ApiException as exc:
            raise ApiFailure.from_exception(exc, f"listing the pods of Job {job_name}") from exc
        items = [self.api_client.sanitize_for_serialization(p) for p in pods.items]
        return sorted(items, key=lambda p: p["metadata"].get("creationTimestamp", ""), reverse=True)

    def pod_log(self, pod: str, follow: bool = False, tail: int | None = None):
        """The log as text, or (follow) a response whose stream() yields bytes as they arrive."""
        kwargs = {"tail_lines": tail} if tail else {}
        try:
            if follow:
                return self.core.read_namespaced_pod_log(pod, self.namespace, follow=True,
                                                         _preload_content=False, **kwargs)
            return self.core.read_namespaced_pod_log(pod, self.namespace, **kwargs)
        except self.ApiException as exc:
            raise ApiFailure.from_exception(exc, f"reading the log of pod {pod}") from exc
