"""The kopf edge: handler registration and start-up. Each handler body is one call.

    qlora-operator                          # every namespace; settings from QLORA_* variables
    qlora-operator -n team-a -n team-b      # only these namespaces
    qlora-operator --leader-elect --leader-election-namespace qlora-system   # one of several replicas
    python -m qlora_operator --help

kopf is edge-triggered: create/update/resume handlers and the Job/pod events only queue a reconcile
(workqueue.py: a fixed pool of workers, one queued reconcile per job however many events came). The
resync (resync.py) checks every job against its actual children every few seconds and queues the
ones that would change, which is what makes the operator level-triggered (a missed event or a
restart costs at most one interval); it is a thread, not a kopf timer, so QLoRAJobs carry no finalizer.
"""

import logging

import kopf
from qlora_api import GROUP, PLURAL, VERSION
from qlora_api.meta import LABEL_MANAGED_BY, MANAGED_BY

from qlora_operator import kube, metrics, settings
from qlora_operator.event_poster import EventPoster
from qlora_operator.kopf_setup import configure_kopf, log_in, run_kopf
from qlora_operator.leadership import run_while_leading
from qlora_operator.reconcile import Reconciler
from qlora_operator.resync import Resync
from qlora_operator.workqueue import WorkQueue

CHILDREN = {LABEL_MANAGED_BY: MANAGED_BY}


def register(reconciler: Reconciler, config: settings.OperatorSettings,
             registry: kopf.OperatorRegistry | None = None, resync: Resync | None = None,
             queue: WorkQueue | None = None) -> kopf.OperatorRegistry:
    """Without a queue, each handler reconciles in kopf's own thread (one job at a time is all a
    test of the handlers needs)."""
    registry = registry or kopf.OperatorRegistry()
    enqueue = queue.add if queue is not None else reconciler.reconcile
    qlorajobs = {"group": GROUP, "version": VERSION, "plural": PLURAL, "registry": registry}

    @kopf.on.startup(registry=registry)
    def configure(settings: kopf.OperatorSettings, **_) -> None:
        configure_kopf(settings, config)

    @kopf.on.login(registry=registry)
    def login(**kwargs) -> kopf.ConnectionInfo | None:
        return log_in(**kwargs)

    @kopf.on.create(**qlorajobs, id="reconcile-on-create")
    def on_create(body: kopf.Body, namespace: str, name: str, **_) -> None:
        if not reconciler.reconcile_new(dict(body)):
            enqueue(namespace, name)

    @kopf.on.resume(**qlorajobs, id="reconcile-on-resume")
    @kopf.on.update(**qlorajobs, id="reconcile-on-update")
    def on_change(namespace: str, name: str, **_) -> None:
        enqueue(namespace, name)

    @kopf.on.startup(registry=registry, id="start-resync")
    def start_resync(**_) -> None:
        if queue is not None:
            queue.start()
        if resync is not None:
            resync.start()

    @kopf.on.cleanup(registry=registry, id="stop-resync")
    def stop_resync(**_) -> None:
        if resync is not None:
            resync.stop()
        if queue is not None:
            queue.stop()

    @kopf.on.event("batch", "v1", "jobs", labels=CHILDREN, registry=registry)
    @kopf.on.event("", "v1", "pods", labels=CHILDREN, registry=registry)
    def on_child_event(body: kopf.Body, **_) -> None:
        owner = reconciler.owner_of(dict(body))
        if owner is not None:
            enqueue(*owner)

    @kopf.on.delete(**qlorajobs, optional=True, id="forget")
    def on_delete(namespace: str, name: str, **_) -> None:
        reconciler.forget(namespace, name)

    return registry


def run(argv: list[str] | None = None) -> None:
    config = settings.parse(argv)
    kopf.configure(debug=config.log_level == "DEBUG", quiet=config.log_level in ("WARNING", "ERROR"))
    logging.getLogger("qlora_operator").setLevel(config.log_level)
    if config.log_level != "DEBUG":  # kopf logs every handler call at INFO; the reconciles log what changed
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    client = kube.Kube(kube.load_client())
    events = EventPoster(client.post_event)
    reconciler = Reconciler(client, config, post_event=events)
    queue = WorkQueue(reconciler.reconcile, config.reconcile_workers)
    resync = Resync(client, reconciler, config.namespaces, config.reconcile_interval, enqueue=queue.add)
    metrics.serve(config.metrics_port)
    registry = register(reconciler, config, resync=resync, queue=queue)
    if config.leader_election:
        run_while_leading(reconciler.kube, config, lambda: run_kopf(registry, config))
    else:
        metrics.LEADER.set(1)
        run_kopf(registry, config)
    events.flush()  # a graceful stop: the Events recorded last still go out


if __name__ == "__main__":
    run()
