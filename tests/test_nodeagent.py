"""The node agent against the real local cluster: what a user sees through kubectl.

Pods are scheduled by the real scheduler onto the agent's node, Jobs are driven by the real Job
controller, and logs come through the API server's pods/log proxy to the agent's HTTPS endpoint.
"""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
from qlora_localcluster.testing import kubectl, private_cluster
from support.polling import wait_for

pytestmark = pytest.mark.cluster


def apply(cluster, namespace: str, *objects: dict) -> None:
    doc = {"apiVersion": "v1", "kind": "List", "items": list(objects)}
    kubectl(cluster, "-n", namespace, "apply", "-f", "-", input=json.dumps(doc))


def get(cluster, namespace: str, kind: str, name: str) -> dict | None:
    r = kubectl(cluster, "-n", namespace, "get", kind, name, "-o", "json", check=False)
    return json.loads(r.stdout) if r.returncode == 0 else None


def pod(name: str, *containers: dict, restart: str = "Never", **spec) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "restartPolicy": restart,
            "containers": list(containers),
            "terminationGracePeriodSeconds": 5,
            **spec,
        },
    }


def sh(script: str, name: str = "main", **extra) -> dict:
    return {"name": name, "image": "busybox:1.36", "command": ["sh", "-c", script], **extra}


def terminal_pod(cluster, namespace: str, name: str, timeout: float = 60.0) -> dict:
    def probe():
        p = get(cluster, namespace, "pod", name)
        return p if p and p["status"].get("phase") in ("Succeeded", "Failed") else None

    return wait_for(f"pod {name} to finish", probe, timeout)


def running_pod(cluster, namespace: str, name: str, timeout: float = 60.0) -> dict:
    def probe():
        p = get(cluster, namespace, "pod", name)
        return p if p and p["status"].get("phase") == "Running" else None

    return wait_for(f"{name} running", probe, timeout)


def container_state(p: dict, i: int = 0) -> dict:
    return p["status"]["containerStatuses"][i]["state"]


def test_node_is_ready_with_gpu_capacity(local_cluster):
    nodes = json.loads(kubectl(local_cluster, "get", "nodes", "-o", "json").stdout)["items"]
    node = next(n for n in nodes if n["metadata"]["name"] == "gpu-node-0")
    ready = next(c for c in node["status"]["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "True"
    assert int(node["status"]["allocatable"]["nvidia.com/gpu"]) >= 1
    assert node["metadata"]["labels"]["nvidia.com/gpu.product"]
    lease = json.loads(
        kubectl(local_cluster, "-n", "kube-node-lease", "get", "lease", "gpu-node-0", "-o", "json").stdout
    )
    assert lease["spec"]["holderIdentity"] == "gpu-node-0"


def test_exit_code_and_termination_message(local_cluster, namespace):
    apply(
        local_cluster,
        namespace,
        pod("exit3", sh("echo hi; echo 'it went wrong' > /dev/termination-log; exit 3")),
        pod("fallback", sh("echo the last line; exit 4", terminationMessagePolicy="FallbackToLogsOnError")),
    )
    p = terminal_pod(local_cluster, namespace, "exit3")
    t = container_state(p)["terminated"]
    assert (p["status"]["phase"], t["exitCode"], t["reason"]) == ("Failed", 3, "Error")
    assert t["message"] == "it went wrong\n"
    assert p["status"]["podIP"] == "127.0.0.1"
    f = container_state(terminal_pod(local_cluster, namespace, "fallback"))["terminated"]
    assert (f["exitCode"], f["message"]) == (4, "the last line\n")


def test_logs_through_the_api_server(local_cluster, namespace):
    apply(local_cluster, namespace, pod("talker", sh("for i in 1 2 3; do echo line $i; sleep 1; done")))
    wait_for(
        "talker running",
        lambda: (
            (get(local_cluster, namespace, "pod", "talker") or {}).get("status", {}).get("phase") == "Running"
        ),
    )
    followed = kubectl(local_cluster, "-n", namespace, "logs", "-f", "talker").stdout
    assert followed == "line 1\nline 2\nline 3\n"
    assert kubectl(local_cluster, "-n", namespace, "logs", "talker", "--tail=1").stdout == "line 3\n"
    stamped = kubectl(local_cluster, "-n", namespace, "logs", "talker", "--timestamps").stdout.splitlines()
    assert stamped[0].endswith(" line 1") and stamped[0].split(" ")[0].endswith("Z")


def test_memory_limit_is_enforced_as_oomkilled(local_cluster, namespace):
    hog = {
        "name": "hog",
        "image": "python:3.11",
        "resources": {"limits": {"memory": "64Mi"}},
        "command": ["python", "-c", "import time; b = b'x' * (256 << 20); time.sleep(60)"],
    }
    apply(local_cluster, namespace, pod("hog", hog))
    t = container_state(terminal_pod(local_cluster, namespace, "hog"))["terminated"]
    assert (t["reason"], t["exitCode"]) == ("OOMKilled", 137)


def test_delete_terminates_the_process_and_the_object_goes(local_cluster, namespace):
    apply(local_cluster, namespace, pod("sleeper", sh("trap 'echo got TERM; exit 0' TERM; sleep 300 & wait")))
    p = running_pod(local_cluster, namespace, "sleeper")
    pid = int(p["status"]["containerStatuses"][0]["containerID"].removeprefix("process://"))
    assert os.path.exists(f"/proc/{pid}")
    started = time.monotonic()
    kubectl(local_cluster, "-n", namespace, "delete", "pod", "sleeper", "--timeout=60s")
    assert get(local_cluster, namespace, "pod", "sleeper") is None
    assert time.monotonic() - started < 30
    assert not os.path.exists(f"/proc/{pid}")


def test_secret_env_configmap_volume_and_field_refs_reach_the_process(local_cluster, namespace):
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "creds"},
        "stringData": {"token": "s3cr3t"},
    }
    cm = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "cfg"},
        "data": {"job.yaml": "steps: 3"},
    }
    reader = sh(
        'echo "token=$TOKEN pod=$POD"; cat /etc/qlora/job.yaml',
        env=[
            {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}},
            {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        ],
        volumeMounts=[{"name": "cfg", "mountPath": "/etc/qlora"}],
    )
    apply(
        local_cluster,
        namespace,
        secret,
        cm,
        pod("reader", reader, volumes=[{"name": "cfg", "configMap": {"name": "cfg"}}]),
    )
    p = terminal_pod(local_cluster, namespace, "reader")
    assert p["status"]["phase"] == "Succeeded"
    out = kubectl(local_cluster, "-n", namespace, "logs", "reader").stdout
    assert out == "token=s3cr3t pod=reader\nsteps: 3"


WHO_AM_I = """
import base64, json, os
from kubernetes import client, config
config.load_config()  # no /var/run/secrets here: falls back to the $KUBECONFIG the agent wrote
review = client.AuthenticationV1Api().create_self_subject_review(
    {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"})
token = open(os.environ["KUBECONFIG"]).read().split("tokenFile: ")[1].split()[0]
claims = json.loads(base64.urlsafe_b64decode(open(token).read().split(".")[1] + "=="))
print(json.dumps({"user": review.status.user_info.username, "hours": (claims["exp"] - claims["iat"]) / 3600}))
"""


def test_a_pod_authenticates_as_its_service_account(local_cluster, namespace):
    apply(local_cluster, namespace, pod("who", {"name": "main", "image": "python:3.11",
                                                "command": ["python", "-c", WHO_AM_I]}))
    assert terminal_pod(local_cluster, namespace, "who")["status"]["phase"] == "Succeeded"
    seen = json.loads(kubectl(local_cluster, "-n", namespace, "logs", "who").stdout)
    assert seen["user"] == f"system:serviceaccount:{namespace}:default"
    # kube-api-access asks for 3607 s; the API server extends such pod-bound tokens to a year, so a
    # token requested once at pod start outlives any pod here (the agent does not refresh tokens).
    assert seen["hours"] >= 24


def test_job_completes_through_the_job_controller(local_cluster, namespace):
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "ok"},
        "spec": {
            "backoffLimit": 0,
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [sh("echo trained")],
                    "terminationGracePeriodSeconds": 5,
                }
            },
        },
    }
    apply(local_cluster, namespace, job)
    kubectl(local_cluster, "-n", namespace, "wait", "--for=condition=Complete", "job/ok", "--timeout=90s")
    j = get(local_cluster, namespace, "job", "ok")
    assert j["status"]["succeeded"] == 1
    assert kubectl(local_cluster, "-n", namespace, "logs", "job/ok").stdout == "trained\n"


def test_unknown_image_is_err_image_pull(local_cluster, namespace):
    apply(local_cluster, namespace, pod("nope", {"name": "main", "image": "registry.example/not-here:1"}))

    def waiting():
        p = get(local_cluster, namespace, "pod", "nope")
        statuses = (p or {}).get("status", {}).get("containerStatuses") or []
        return statuses and statuses[0]["state"].get("waiting")

    w = wait_for(
        "ErrImagePull",
        lambda: (lambda x: x if x and x["reason"] in ("ErrImagePull", "ImagePullBackOff") else None)(
            waiting()
        ),
    )
    assert "local image table" in w["message"]
    assert get(local_cluster, namespace, "pod", "nope")["status"]["phase"] == "Pending"
    backoff = wait_for(
        "ImagePullBackOff",
        lambda: (lambda x: x if x and x["reason"] == "ImagePullBackOff" else None)(waiting()),
        timeout=30,
    )
    assert "not-here" in backoff["message"]


def test_eviction_stops_the_pod(local_cluster, namespace):
    apply(local_cluster, namespace, pod("evictee", sh("sleep 300")))
    wait_for(
        "evictee running",
        lambda: (
            (get(local_cluster, namespace, "pod", "evictee") or {}).get("status", {}).get("phase")
            == "Running"
        ),
    )
    eviction = {
        "apiVersion": "policy/v1",
        "kind": "Eviction",
        "metadata": {"name": "evictee", "namespace": namespace},
    }
    kubectl(
        local_cluster,
        "create",
        "--raw",
        f"/api/v1/namespaces/{namespace}/pods/evictee/eviction",
        "-f",
        "-",
        input=json.dumps(eviction),
    )
    wait_for("evicted pod to go", lambda: get(local_cluster, namespace, "pod", "evictee") is None, timeout=30)


def test_kubectl_logs_of_unknown_container_is_an_error(local_cluster, namespace):
    apply(local_cluster, namespace, pod("quiet", sh("true")))
    terminal_pod(local_cluster, namespace, "quiet")
    r = kubectl(local_cluster, "-n", namespace, "logs", "quiet", "--previous", check=False)
    assert r.returncode != 0 and "previous terminated container" in r.stderr


def test_restart_policy_on_failure_restarts_in_place(local_cluster, namespace):
    script = "n=$(cat $HOME/n 2>/dev/null || echo 0); echo $((n+1)) > $HOME/n; [ $n -ge 1 ]"
    apply(local_cluster, namespace, pod("flaky", sh(script), restart="OnFailure"))
    p = terminal_pod(local_cluster, namespace, "flaky", timeout=60)
    cs = p["status"]["containerStatuses"][0]
    assert p["status"]["phase"] == "Succeeded" and cs["restartCount"] == 1
    assert cs["lastState"]["terminated"]["exitCode"] == 1


def test_agent_restart_fails_the_pods_it_cannot_reattach(tmp_path):
    """A crashed agent leaves a running pod behind; the next agent stops it and reports it Failed.
    On a cluster of its own: the suite runs in parallel workers, and killing the session cluster's
    agent would fail every pod the other workers' tests have on that node."""
    from qlora_localcluster import processes

    with private_cluster(tmp_path / "cluster") as cluster:
        namespace = "orphans"
        kubectl(cluster, "create", "namespace", namespace)
        wait_for("the namespace's default ServiceAccount", lambda: kubectl(
            cluster, "-n", namespace, "get", "serviceaccount", "default", check=False).returncode == 0, timeout=30)
        apply(cluster, namespace, pod("orphan", sh("sleep 300")))
        p = running_pod(cluster, namespace, "orphan")
        pid = int(p["status"]["containerStatuses"][0]["containerID"].removeprefix("process://"))
        node = p["spec"]["nodeName"]
        agent_pid = processes.running_pid(cluster.state_dir / "pids" / f"node-agent-{node}.pid")
        assert agent_pid
        os.kill(agent_pid, signal.SIGKILL)  # a crash: no clean shutdown
        wait_for("agent gone", lambda: processes.exited(agent_pid), timeout=10)
        assert os.path.exists(f"/proc/{pid}")  # the container outlived its agent
        cluster.up()
        p = terminal_pod(cluster, namespace, "orphan", timeout=30)
        assert (p["status"]["phase"], p["status"]["reason"]) == ("Failed", "NodeAgentRestarted")
        assert container_state(p)["terminated"]["reason"] == "ContainerStatusUnknown"
        wait_for("leftover process killed", lambda: not os.path.exists(f"/proc/{pid}"), timeout=10)
