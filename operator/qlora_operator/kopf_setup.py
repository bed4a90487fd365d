"""How kopf itself is configured: where it keeps its bookkeeping, what it must not do, how it runs."""

import kopf

from qlora_operator.settings import OperatorSettings


def configure_kopf(kopf_settings: kopf.OperatorSettings, config: OperatorSettings) -> None:
    prefix = config.kopf_annotation_prefix
    persistence = kopf_settings.persistence
    # The status schema is structural: kopf's default `status.kopf` would be pruned away. Its
    # handler progress and diff base go into annotations under our own prefix instead.
    persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=prefix)
    persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=prefix,
                                                                   key="last-handled-configuration")
    # kopf keeps timers on a finalizer so it can stop them before the object goes away.
    persistence.finalizer = f"{prefix}/finalizer"
    # The operator records its own Events on transitions; kopf's per-handler ones would be noise.
    kopf_settings.posting.enabled = False
    # No cluster-wide CRD or namespace watches: the CRD exists before the operator starts (the chart
    # installs it), and namespaces are exact names, so the ClusterRole can leave both out.
    kopf_settings.scanning.disabled = True
    kopf_settings.watching.server_timeout = 300
    kopf_settings.watching.client_timeout = 330
    # The handlers only queue work (workqueue.py), except a new job's first reconcile (three
    # writes, reconcile.py: reconcile_new), which is what a burst of creations waits for.
    kopf_settings.execution.max_workers = 32


def log_in(**kwargs) -> kopf.ConnectionInfo | None:
    """The same credentials the kubernetes client uses (kube.load_client), through the same loader:
    the pod's ServiceAccount, else $KUBECONFIG. kopf's own minimal kubeconfig reader ignores
    `tokenFile`, which the local cluster's node agent uses for a pod's ServiceAccount token.
    (A registry of our own gets none of kopf's default login handlers.)"""
    return kopf.login_via_client(**kwargs)


def run_kopf(registry: kopf.OperatorRegistry, config: OperatorSettings) -> None:
    """Standalone: kopf's peering objects only pause peers, they are not a lock. With several
    replicas, the Lease (leadership.py) decides which one gets here at all."""
    liveness = f"http://0.0.0.0:{config.health_port}/healthz" if config.health_port else None
    kopf.run(
        registry=registry,
        standalone=True,
        clusterwide=config.all_namespaces,
        namespaces=list(config.namespaces),
        liveness_endpoint=liveness,
    )
