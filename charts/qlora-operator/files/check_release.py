"""`helm test` for a qlora-operator release: the QLoRAJob CRD is established and the operator
answers on its metrics Service.

It runs in the operator's own image (Python and the `kubernetes` client are already there, so a
cluster that can pull the operator needs no other image) as a ServiceAccount that may read that one
CRD, the release's metrics Service and the pods in its namespace. It goes where the Service sends
traffic, to each ready pod its selector matches on the Service's target port, rather than through
the cluster IP: that proves the Service selects the operator's pods, tells the replicas apart, and
needs neither cluster DNS nor a Service proxy on the node.

    python check_release.py --crd qlorajobs.training.qlora-operator.dev \
        --namespace qlora-system --service qlora-qlora-operator-metrics
"""

import argparse
import sys
import time
import urllib.request

from kubernetes import client, config

METRIC_PREFIX = "qlora_operator_"  # every series the operator exports starts with it


def log_in() -> None:
    """The pod's ServiceAccount; $KUBECONFIG where a node provides one instead (as the operator does)."""
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()


def crd_problem(name: str) -> str | None:
    crd = client.ApiextensionsV1Api().read_custom_resource_definition(name)
    conditions = {c.type: c for c in (crd.status.conditions or [])}
    for wanted in ("NamesAccepted", "Established"):
        condition = conditions.get(wanted)
        if condition is None or condition.status != "True":
            why = f"{condition.reason}: {condition.message}" if condition else "no such condition yet"
            return f"CRD {name} is not {wanted} ({why})"
    print(f"ok: CRD {name} is Established, serving {[v.name for v in crd.spec.versions if v.served]}")
    return None


def service_targets(namespace: str, service: str, port_name: str) -> list[str]:
    """host:port of every ready pod the Service selects, on the Service's target port: where the
    Service (and a scrape through it) sends traffic."""
    svc = client.CoreV1Api().read_namespaced_service(service, namespace)
    port = next((p for p in svc.spec.ports if p.name == port_name), None)
    if port is None or not svc.spec.selector:
        raise LookupError(f"Service {namespace}/{service} has no port {port_name!r} or no selector")
    selector = ",".join(f"{key}={value}" for key, value in svc.spec.selector.items())
    targets = []
    for pod in client.CoreV1Api().list_namespaced_pod(namespace, label_selector=selector).items:
        ready = any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or [])
        if not ready or pod.metadata.deletion_timestamp or not pod.status.pod_ip:
            continue
        number = port.target_port
        if isinstance(number, str):  # a named port: the container port of that name
            number = next((p.container_port for c in pod.spec.containers for p in c.ports or []
                           if p.name == number), None)
        if number is not None:
            host = f"[{pod.status.pod_ip}]" if ":" in pod.status.pod_ip else pod.status.pod_ip
            targets.append(f"{host}:{number}")
    return targets


def metrics_problem(target: str, timeout: float) -> str | None:
    try:
        with urllib.request.urlopen(f"http://{target}/metrics", timeout=timeout) as response:
            body = response.read().decode(errors="replace")
    except OSError as error:
        return f"{target}/metrics did not answer: {error}"
    series = [line for line in body.splitlines() if line.startswith(METRIC_PREFIX)]
    if not series:
        return f"{target}/metrics answered without any {METRIC_PREFIX}* series"
    print(f"ok: operator at {target} answered /metrics with {len(series)} {METRIC_PREFIX}* series")
    return None


def operator_problem(namespace: str, service: str, port_name: str, timeout: float) -> str | None:
    """None once any ready pod behind the Service answers. A standby replica (leader election) may
    serve nothing until it leads, so one answering replica is enough; each one that does not is
    reported."""
    deadline = time.monotonic() + timeout
    while True:
        targets = service_targets(namespace, service, port_name)
        problems = [metrics_problem(t, timeout=5) for t in targets]
        for problem in problems:
            if problem:
                print(f"note: {problem}")
        if any(p is None for p in problems):
            return None
        if time.monotonic() > deadline:
            if not targets:
                return f"Service {namespace}/{service} selects no ready pod"
            return f"no pod behind Service {namespace}/{service} answered: " + "; ".join(problems)
        time.sleep(2)  # a pod that has just started may not listen yet


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--crd", required=True)
    parser.add_argument("--namespace", required=True)
    parser.add_argument("--service", required=True)
    parser.add_argument("--port-name", default="metrics")
    parser.add_argument("--timeout", type=float, default=30, help="seconds to wait for an answer")
    args = parser.parse_args(argv)
    log_in()
    try:
        problems = [p for p in (crd_problem(args.crd),
                                operator_problem(args.namespace, args.service, args.port_name, args.timeout)) if p]
    except client.ApiException as error:  # a missing object or a permission this check lacks
        problems = [f"the API server answered {error.status} {error.reason}: {error.body}"]
    except LookupError as error:
        problems = [str(error)]
    for problem in problems:
        print(f"FAILED: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
