"""Node agent without a cluster: the pure parts, and the process runtime running real processes.

The runtime tests drive PodRun with pod dicts and a dict-backed Secret/ConfigMap reader, so they
run real process groups (exit codes, OOM kills, restarts, deadlines) in a second or two each.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from qlora_localcluster.nodeagent.image_table import ImageEntry, ImageNotInTable, ImageTable, repository_path
from qlora_localcluster.nodeagent.launch import (
    ContainerConfigError,
    PathMap,
    build_launch,
    expand_refs,
    resolve_env,
)
from qlora_localcluster.nodeagent.log_server import client_authorized, parse_log_options
from qlora_localcluster.nodeagent.logs import LogOptions, LogWriter, read_log
from qlora_localcluster.nodeagent.node import NodeConfig, node_labels, node_status
from qlora_localcluster.nodeagent.pod_run import PodRun, RuntimeConfig, backoff_seconds
from qlora_localcluster.nodeagent.process_runtime import ProcessProvider
from qlora_localcluster.nodeagent.status import ContainerRecord, build_pod_status, pod_phase
from qlora_localcluster.nodeagent.volumes import VolumeError, materialize


class DictReader:
    """Secrets and ConfigMaps from dicts, as the API would return them."""

    def __init__(self, secrets=None, configmaps=None):
        self.secrets = {
            k: {
                "metadata": {"name": k, "namespace": "ns"},
                "data": {kk: base64.b64encode(v.encode()).decode() for kk, v in d.items()},
            }
            for k, d in (secrets or {}).items()
        }
        self.configmaps = {
            k: {"metadata": {"name": k, "namespace": "ns"}, "data": d} for k, d in (configmaps or {}).items()
        }

    def get_secret(self, namespace, name):
        return self.secrets.get(name)

    def get_configmap(self, namespace, name):
        return self.configmaps.get(name)

    def service_account_token(self, pod, audience, expiration_seconds):
        return "token-for-" + pod["metadata"]["name"]


def make_pod(containers, init=None, restart="Never", **spec):
    return {
        "metadata": {"name": "p", "namespace": "ns", "uid": str(uuid.uuid4())},
        "spec": {
            "containers": containers,
            "initContainers": init or [],
            "restartPolicy": restart,
            "nodeName": "n0",
            "terminationGracePeriodSeconds": 2,
            **spec,
        },
        "status": {},
    }


def sh(name, script, **extra):
    return {"name": name, "image": "busybox", "command": ["sh", "-c", script], **extra}


# ---- image table ---------------------------------------------------------------------------------
def test_repository_path_drops_registry_tag_and_digest():
    assert repository_path("ghcr.io/acme/qlora-operator/trainer:0.1") == "acme/qlora-operator/trainer"
    assert repository_path("localhost:5000/busybox@sha256:abc") == "busybox"
    assert repository_path("python:3.11-slim") == "python"
    assert repository_path("library/busybox") == "library/busybox"


def test_image_table_follows_kubernetes_entrypoint_rules():
    t = ImageTable()
    trainer = [sys.executable, "-m", "qlora_trainer"]
    assert t.argv("ghcr.io/x/qlora-operator/trainer:1", None, None) == trainer
    assert t.argv("qlora-trainer:dev", None, ["--config", "c.yaml"]) == trainer + ["--config", "c.yaml"]
    assert t.argv("python:3.11", ["python", "-c", "1"], None) == [sys.executable, "-c", "1"]
    assert t.argv("docker.io/library/busybox:1.36", None, None) == ["/bin/sh"]
    assert t.argv("busybox", ["sh", "-c", "x"], ["ignored?"]) == ["/bin/sh", "-c", "x", "ignored?"]
    with pytest.raises(ImageNotInTable, match="not in the node agent's local image table"):
        t.lookup("nginx:latest")


def test_operator_image_runs_the_operator_module():
    operator = [sys.executable, "-m", "qlora_operator"]
    t = ImageTable()
    assert t.argv("ghcr.io/qlora-operator/operator:0.1.0", None, None) == operator
    assert t.argv("qlora-operator/operator", None, ["-n", "ml"]) == operator + ["-n", "ml"]
    assert t.argv("registry.local:5000/acme/qlora-operator/operator@sha256:ab", None, None) == operator


def test_image_table_file_adds_entries(tmp_path):
    f = tmp_path / "images.json"
    f.write_text(json.dumps([{"name": "tool", "patterns": ["acme/tool"], "entrypoint": ["/bin/echo"]}]))
    assert ImageTable.with_file(str(f)).argv("reg.io/acme/tool:2", None, ["x"]) == ["/bin/echo", "x"]


# ---- env and paths -------------------------------------------------------------------------------
def test_expand_refs_like_kubelet():
    env = {"A": "1", "B": "two"}
    assert expand_refs("$(A)-$(B)-$(C)-$$(A)-$$", env) == "1-two-$(C)-$(A)-$"


def test_path_map_rewrites_whole_paths_only():
    m = PathMap({"/etc/cfg": "/host/cfg", "/etc/cfg/deep": "/host/deep", "/dev/termination-log": "/h/t"})
    assert m.rewrite("/etc/cfg") == "/host/cfg"
    assert m.rewrite("/etc/cfg/a.yaml") == "/host/cfg/a.yaml"
    assert m.rewrite("/etc/cfg/deep/x") == "/host/deep/x"  # longest mount wins
    assert m.rewrite("--config=/etc/cfg/a.yaml") == "--config=/host/cfg/a.yaml"
    assert m.rewrite("cat /etc/cfg/a && echo x > /dev/termination-log") == "cat /host/cfg/a && echo x > /h/t"
    for untouched in ("/etc/cfg2/a", "s3://b/etc/cfg/a", "etc/cfg", "/x/etc/cfg"):
        assert m.rewrite(untouched) == untouched


def test_resolve_env_sources_and_order():
    reader = DictReader(secrets={"s": {"token": "sekret"}}, configmaps={"c": {"MODE": "fast", "X": "cm"}})
    pod = make_pod([])
    pod["status"]["podIP"] = "127.0.0.1"
    container = {
        "name": "c",
        "image": "busybox",
        "envFrom": [{"configMapRef": {"name": "c"}, "prefix": "CM_"}],
        "env": [
            {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "s", "key": "token"}}},
            {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
            {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "MODE2", "value": "$(CM_MODE)-$(POD)"},
            {"name": "OPT", "valueFrom": {"secretKeyRef": {"name": "gone", "key": "k", "optional": True}}},
        ],
    }
    env = resolve_env(pod, container, reader)
    assert env == {
        "CM_MODE": "fast",
        "CM_X": "cm",
        "TOKEN": "sekret",
        "POD": "p",
        "NODE": "n0",
        "IP": "127.0.0.1",
        "MODE2": "fast-p",
    }
    container["env"].append({"name": "BAD", "valueFrom": {"secretKeyRef": {"name": "gone", "key": "k"}}})
    with pytest.raises(ContainerConfigError, match='secret "gone" not found'):
        resolve_env(pod, container, reader)


def test_volumes_and_launch_map_container_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("AGENT_ONLY_SECRET", "x")
    monkeypatch.setenv("PASSED_ON", "y")
    reader = DictReader(
        secrets={"creds": {"key": "v1", "other": "v2"}}, configmaps={"cfg": {"job.yaml": "a: 1"}}
    )
    pod = make_pod(
        [],
        volumes=[
            {"name": "cfg", "configMap": {"name": "cfg"}},
            {"name": "creds", "secret": {"secretName": "creds", "items": [{"key": "key", "path": "sub/k"}]}},
            {"name": "scratch", "emptyDir": {}},
            {"name": "token", "projected": {"sources": [{"serviceAccountToken": {"path": "token"}}]}},
        ],
    )
    paths = materialize(pod, tmp_path, reader)
    assert Path(paths["cfg"], "job.yaml").read_text() == "a: 1"
    assert Path(paths["creds"], "sub/k").read_text() == "v1"
    assert not Path(paths["creds"], "other").exists()
    assert Path(paths["token"], "token").read_text() == "token-for-p"
    assert Path(paths["scratch"]).is_dir() and str(tmp_path) in paths["scratch"]

    container = {
        "name": "main",
        "image": "qlora-trainer:1",
        "args": ["--config", "/etc/qlora/job.yaml"],
        "workingDir": "/work",
        "env": [{"name": "OUT", "value": "/scratch/out"}, {"name": "TMSG", "value": "/dev/termination-log"}],
        "volumeMounts": [
            {"name": "cfg", "mountPath": "/etc/qlora"},
            {"name": "scratch", "mountPath": "/scratch"},
        ],
    }
    launch = build_launch(
        pod,
        container,
        images=ImageTable(),
        reader=reader,
        pod_dir=tmp_path,
        volume_host_paths=paths,
        pass_env=["PASSED_ON"],
    )
    assert launch.argv == [sys.executable, "-m", "qlora_trainer", "--config", f"{paths['cfg']}/job.yaml"]
    assert launch.env["OUT"] == f"{paths['scratch']}/out"
    assert launch.env["TMSG"] == launch.termination_message_host_path
    assert launch.env["HOME"] == str(tmp_path)
    assert json.loads(launch.env["NODEAGENT_PATH_MAP"])["/etc/qlora"] == paths["cfg"]
    assert launch.cwd.startswith(str(tmp_path)) and launch.cwd.endswith("/work")  # never the host's /work
    assert "AGENT_ONLY_SECRET" not in launch.env and launch.env["PASSED_ON"] == "y"


def test_a_headless_service_name_of_the_pods_own_subdomain_becomes_loopback(tmp_path):
    """No DNS and one address: `<hostname>.<subdomain>` (a data-parallel group's rendezvous) is 127.0.0.1."""
    pod = {"metadata": {"name": "demo-1-0-abcde", "namespace": "ml", "uid": "u"},
           "spec": {"nodeName": "n", "hostname": "demo-1-0", "subdomain": "demo-1"}, "status": {}}
    container = {"name": "trainer", "image": "qlora-trainer:1",
                 "args": ["--master-addr=demo-1-0.demo-1", "--peer", "demo-1-3.demo-1.ml.svc.cluster.local:29500",
                          "--other", "demo-1-0.demo-1.other-ns", "--s3", "s3://b/demo-1-0.demo-1x"],
                 "env": [{"name": "MASTER", "value": "demo-1-0.demo-1.ml.svc"}]}
    launch = build_launch(pod, container, images=ImageTable(), reader=DictReader(), pod_dir=tmp_path,
                          volume_host_paths={}, pass_env=[])
    assert launch.argv[3:] == ["--master-addr=127.0.0.1", "--peer", "127.0.0.1:29500",
                               "--other", "demo-1-0.demo-1.other-ns", "--s3", "s3://b/demo-1-0.demo-1x"]
    assert launch.env["MASTER"] == "127.0.0.1"
    assert launch.env["HOSTNAME"] == "demo-1-0"  # spec.hostname, as a kubelet names the pod's host


def test_the_image_tables_host_argv_is_never_path_mapped(tmp_path):
    # The chart mounts an emptyDir at /tmp; a checkout (and so its venv) may live under /tmp too.
    table = ImageTable([ImageEntry("op", ("op",), entrypoint=("/tmp/checkout/.venv/bin/python", "-m", "op"))])
    pod = {"metadata": {"name": "p", "namespace": "ns", "uid": "u"}, "spec": {"nodeName": "n"}, "status": {}}
    container = {"name": "c", "image": "op:1", "args": ["--scratch", "/tmp/work"],
                 "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}]}
    launch = build_launch(pod, container, images=table, reader=DictReader(), pod_dir=tmp_path,
                          volume_host_paths={"tmp": str(tmp_path / "vol-tmp")}, pass_env=[])
    assert launch.argv == ["/tmp/checkout/.venv/bin/python", "-m", "op", "--scratch", f"{tmp_path}/vol-tmp/work"]


# What the ServiceAccount admission plugin adds to every pod that automounts its token.
SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
KUBE_API_ACCESS = {
    "name": "kube-api-access-x1y2z",
    "projected": {
        "defaultMode": 420,
        "sources": [
            {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
            {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
            {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"fieldPath": "metadata.namespace"}}]}},
        ],
    },
}
CA_PEM = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"


def in_cluster_pod(*containers):
    pod = make_pod(list(containers), volumes=[KUBE_API_ACCESS], serviceAccountName="robot")
    for c in pod["spec"]["containers"]:
        c.setdefault("volumeMounts", []).append({"name": KUBE_API_ACCESS["name"], "mountPath": SA_DIR, "readOnly": True})
    return pod


def test_a_service_account_token_mount_becomes_the_containers_kubeconfig(tmp_path):
    from kubernetes import client, config

    reader = DictReader(configmaps={"kube-root-ca.crt": {"ca.crt": CA_PEM}})
    pod = in_cluster_pod({"name": "op", "image": "qlora-operator/operator:1"})
    paths = materialize(pod, tmp_path, reader)
    launch = build_launch(pod, pod["spec"]["containers"][0], images=ImageTable(), reader=reader,
                          pod_dir=tmp_path, volume_host_paths=paths, pass_env=[],
                          api_server="https://127.0.0.1:16443")
    kubeconfig = Path(launch.env["KUBECONFIG"])
    assert kubeconfig.is_relative_to(tmp_path) and kubeconfig.stat().st_mode & 0o077 == 0

    # What any client library makes of it: the API server, the pod's token and CA, its namespace.
    cfg = client.Configuration()
    config.load_kube_config(config_file=str(kubeconfig), client_configuration=cfg)
    assert cfg.host == "https://127.0.0.1:16443"
    bearer = cfg.get_api_key_with_prefix("BearerToken") or cfg.get_api_key_with_prefix("authorization")
    assert bearer == "Bearer token-for-p"
    assert Path(cfg.ssl_ca_cert).read_text() == CA_PEM
    _, context = config.list_kube_config_contexts(str(kubeconfig))
    assert context["context"]["namespace"] == "ns"
    assert context["context"]["user"] == "system:serviceaccount:ns:robot"


def test_kubeconfig_only_for_a_token_volume_and_never_over_the_containers_own(tmp_path, monkeypatch):
    monkeypatch.setenv("KUBECONFIG", "/agents/own/kubeconfig")
    reader = DictReader(configmaps={"kube-root-ca.crt": {"ca.crt": CA_PEM}, "cfg": {"a": "1"}})
    own = {"name": "own", "image": "busybox", "env": [{"name": "KUBECONFIG", "value": "/etc/kc/config"}]}
    plain = {"name": "plain", "image": "busybox"}
    pod = in_cluster_pod(own, plain)
    pod["spec"]["containers"].append({"name": "none", "image": "busybox"})  # automount off, in effect
    pod["spec"]["containers"].append({"name": "impostor", "image": "busybox",
                                      "volumeMounts": [{"name": "cfg", "mountPath": SA_DIR}]})
    pod["spec"]["volumes"].append({"name": "cfg", "projected": {"sources": [{"configMap": {"name": "cfg"}}]}})
    paths = materialize(pod, tmp_path, reader)

    def env_of(name, api_server="https://127.0.0.1:16443"):
        container = next(c for c in pod["spec"]["containers"] if c["name"] == name)
        return build_launch(pod, container, images=ImageTable(), reader=reader, pod_dir=tmp_path,
                            volume_host_paths=paths, pass_env=["KUBECONFIG"], api_server=api_server).env

    assert env_of("own")["KUBECONFIG"] == "/etc/kc/config"
    assert env_of("plain")["KUBECONFIG"].startswith(str(tmp_path))  # the pod's identity, not the agent's
    assert env_of("plain", api_server="")["KUBECONFIG"] == "/agents/own/kubeconfig"  # no server known
    assert env_of("none")["KUBECONFIG"] == "/agents/own/kubeconfig"
    assert env_of("impostor")["KUBECONFIG"] == "/agents/own/kubeconfig"


def test_missing_volume_source_fails_the_mount(tmp_path):
    pod = make_pod([], volumes=[{"name": "v", "configMap": {"name": "absent"}}])
    with pytest.raises(VolumeError, match='configmap "absent" not found'):
        materialize(pod, tmp_path, DictReader())
    pod = make_pod([], volumes=[{"name": "v", "persistentVolumeClaim": {"claimName": "x"}}])
    with pytest.raises(VolumeError, match="not supported"):
        materialize(pod, tmp_path, DictReader())


# ---- status --------------------------------------------------------------------------------------
def rec(name, **kw):
    r = ContainerRecord(name, "busybox")
    for k, v in kw.items():
        setattr(r, k, v)
    return r


def test_pod_phase_like_kubelet():
    done0 = {"exitCode": 0}
    done1 = {"exitCode": 1}
    assert pod_phase("Never", [], [rec("a")]) == "Pending"
    assert pod_phase("Never", [], [rec("a", started_at="t")]) == "Running"
    assert pod_phase("Never", [], [rec("a", terminated=done0)]) == "Succeeded"
    assert pod_phase("Never", [], [rec("a", terminated=done0), rec("b", terminated=done1)]) == "Failed"
    assert pod_phase("OnFailure", [], [rec("a", last_terminated=done1)]) == "Running"
    assert pod_phase("Always", [], [rec("a", terminated=done0)]) == "Running"
    assert pod_phase("Never", [rec("i", terminated=done1)], [rec("a")]) == "Failed"
    assert pod_phase("OnFailure", [rec("i", last_terminated=done1)], [rec("a")]) == "Pending"


def test_build_pod_status_keeps_foreign_conditions_and_transition_times():
    pod = make_pod([])
    scheduled = {"type": "PodScheduled", "status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z"}
    ready_before = {"type": "Ready", "status": "False", "lastTransitionTime": "2026-01-01T00:00:01Z"}
    pod["status"] = {"conditions": [scheduled, ready_before]}
    st = build_pod_status(
        pod,
        [],
        [rec("a", terminated={"exitCode": 0, "reason": "Completed"})],
        start_time="2026-01-01T00:00:00Z",
        now="2026-01-01T00:00:09Z",
    )
    by_type = {c["type"]: c for c in st["conditions"]}
    assert st["phase"] == "Succeeded"
    assert by_type["PodScheduled"] == scheduled
    assert by_type["Ready"]["lastTransitionTime"] == "2026-01-01T00:00:01Z"
    assert by_type["Ready"]["reason"] == "PodCompleted"
    assert by_type["Initialized"]["status"] == "True"
    assert st["containerStatuses"][0]["state"]["terminated"]["reason"] == "Completed"
    assert st["podIP"] == st["hostIP"] == "127.0.0.1"


def test_node_advertises_gpus():
    cfg = NodeConfig(name="gpu-node-7", port=20257, gpus=2, gpu_product="NVIDIA-H100-80GB-HBM3")
    labels = node_labels(cfg)
    assert labels["nvidia.com/gpu.count"] == "2" and labels["kubernetes.io/hostname"] == "gpu-node-7"
    st = node_status(cfg, "v1.36.3", True, [])
    assert st["capacity"]["nvidia.com/gpu"] == st["allocatable"]["nvidia.com/gpu"] == "2"
    assert st["daemonEndpoints"]["kubeletEndpoint"]["Port"] == 20257
    assert {"type": "InternalIP", "address": "127.0.0.1"} in st["addresses"]
    assert [c for c in st["conditions"] if c["type"] == "Ready"][0]["status"] == "True"
    assert [c for c in node_status(cfg, "v", False, [])["conditions"] if c["type"] == "Ready"][0][
        "status"
    ] == "False"


# ---- logs ----------------------------------------------------------------------------------------
def test_log_file_round_trip_with_tail_limit_and_timestamps(tmp_path):
    path = tmp_path / "0.log"
    proc = subprocess.Popen(
        ["sh", "-c", "echo one; echo two >&2; printf three; sleep 0.1; echo -n"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    w = LogWriter(path)
    w.attach("stdout", proc.stdout)
    w.attach("stderr", proc.stderr)
    proc.wait()
    w.close()
    text = b"".join(read_log(path, LogOptions())).decode()
    assert sorted(text.splitlines()) == ["one", "three", "two"]
    assert b"".join(read_log(path, LogOptions(tail_lines=1))) == b"three"  # the unterminated last line
    assert len(b"".join(read_log(path, LogOptions(limit_bytes=5)))) == 5
    stamped = b"".join(read_log(path, LogOptions(timestamps=True))).decode().splitlines()[0]
    assert stamped.split(" ", 1)[0].endswith("Z") and stamped.split(" ", 1)[1] in ("one", "two", "three")
    assert b"".join(read_log(path, LogOptions(since_time="2999-01-01T00:00:00Z"))) == b""
    assert b"".join(read_log(path, LogOptions(since_seconds=60))) == b"".join(read_log(path, LogOptions()))


def test_follow_streams_until_the_process_ends(tmp_path):
    path = tmp_path / "0.log"
    proc = subprocess.Popen(
        ["sh", "-c", "for i in 1 2 3; do echo line$i; sleep 0.3; done"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    w = LogWriter(path)
    w.attach("stdout", proc.stdout)
    w.attach("stderr", proc.stderr)
    got = b"".join(read_log(path, LogOptions(follow=True), lambda: proc.poll() is None, poll=0.05))
    w.close()
    assert got == b"line1\nline2\nline3\n"


def test_log_query_and_client_identity():
    o = parse_log_options("follow=true&tailLines=10&limitBytes=5&timestamps=true&previous=false")
    assert (o.follow, o.tail_lines, o.limit_bytes, o.timestamps, o.previous) == (True, 10, 5, True, False)
    apiserver = {
        "subject": (
            (("organizationName", "system:masters"),),
            (("commonName", "kube-apiserver-kubelet-client"),),
        )
    }
    a_node = {"subject": ((("organizationName", "system:nodes"),), (("commonName", "system:node:n"),))}
    assert client_authorized(apiserver)
    assert not client_authorized(a_node) and not client_authorized(None)


# ---- the process runtime -------------------------------------------------------------------------
def run_pod(tmp_path, pod, reader=None, timeout=20.0) -> PodRun:
    run = PodRun(
        pod,
        tmp_path / pod["metadata"]["uid"],
        RuntimeConfig(ImageTable(), reader or DictReader(), []),
        notify=lambda uid: None,
    )
    run.dir.mkdir(parents=True)
    run.start()
    assert run.wait(timeout), run.status()
    return run


def state(status, i=0):
    return status["containerStatuses"][i]["state"]


def test_runtime_exit_code_message_and_fallback_to_logs(tmp_path):
    pod = make_pod(
        [
            sh("a", "echo hi; echo 'from file' > /dev/termination-log; exit 3"),
            sh("b", "echo last words; exit 2", terminationMessagePolicy="FallbackToLogsOnError"),
            sh("c", "exit 0"),
        ]
    )
    st = run_pod(tmp_path, pod).status()
    assert st["phase"] == "Failed"
    a, b, c = (state(st, i)["terminated"] for i in range(3))
    assert (a["exitCode"], a["reason"], a["message"]) == (3, "Error", "from file\n")
    assert (b["exitCode"], b["message"]) == (2, "last words\n")
    assert (c["exitCode"], c["reason"]) == (0, "Completed")


def test_runtime_hands_the_pods_kubeconfig_to_its_process(tmp_path):
    reader = DictReader(configmaps={"kube-root-ca.crt": {"ca.crt": CA_PEM}})
    pod = in_cluster_pod(sh("main", 'cat "$(sed -n "s/.*tokenFile: //p" "$KUBECONFIG")" > /dev/termination-log'))
    run = PodRun(pod, tmp_path / "p", RuntimeConfig(ImageTable(), reader, [], "https://127.0.0.1:16443"),
                 notify=lambda uid: None)
    run.dir.mkdir()
    run.start()
    assert run.wait(10), run.status()
    assert state(run.status())["terminated"]["message"] == "token-for-p"


def test_runtime_init_containers_run_first_in_order(tmp_path):
    pod = make_pod(
        [sh("main", "cat $HOME/order")],
        init=[sh("one", "echo one >> $HOME/order"), sh("two", "echo two >> $HOME/order")],
    )
    run = run_pod(tmp_path, pod)
    st = run.status()
    assert st["phase"] == "Succeeded"
    assert [s["state"]["terminated"]["exitCode"] for s in st["initContainerStatuses"]] == [0, 0]
    assert b"".join(read_log(run.log_path("main", 0), LogOptions())) == b"one\ntwo\n"


def test_runtime_oom_kill(tmp_path):
    hog = {
        "name": "hog",
        "image": "python:3.11",
        "resources": {"limits": {"memory": "64Mi"}},
        "command": ["python", "-c", "import time; b = b'x' * (256 << 20); time.sleep(30)"],
    }
    st = run_pod(tmp_path, make_pod([hog])).status()
    t = state(st)["terminated"]
    assert (t["reason"], t["exitCode"], st["phase"]) == ("OOMKilled", 137, "Failed")


def test_runtime_on_failure_restarts_until_success(tmp_path, monkeypatch):
    monkeypatch.setattr("qlora_localcluster.nodeagent.pod_run.backoff_seconds", lambda n: 0.2)
    script = "n=$(cat $HOME/n 2>/dev/null || echo 0); echo $((n+1)) > $HOME/n; [ $n -ge 2 ]"
    st = run_pod(tmp_path, make_pod([sh("flaky", script)], restart="OnFailure")).status()
    cs = st["containerStatuses"][0]
    assert st["phase"] == "Succeeded" and cs["restartCount"] == 2
    assert cs["lastState"]["terminated"]["exitCode"] == 1


def test_backoff_doubles_to_five_minutes():
    assert [backoff_seconds(n) for n in (1, 2, 3, 6, 20)] == [10, 20, 40, 300, 300]


def test_runtime_deadline_and_stop_kill_the_process_group(tmp_path):
    pod = make_pod([sh("sleeper", "sleep 60 & echo $! > $HOME/child; wait")], activeDeadlineSeconds=1)
    run = run_pod(tmp_path, pod)
    st = run.status()
    assert (st["phase"], st["reason"]) == ("Failed", "DeadlineExceeded")
    child = int((run.dir / "child").read_text())
    time.sleep(0.2)
    assert not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text().split()[2]


def test_runtime_unknown_image_waits_in_err_image_pull(tmp_path):
    pod = make_pod([{"name": "x", "image": "registry.example/nope:1"}])
    run = PodRun(pod, tmp_path / "p", RuntimeConfig(ImageTable(), DictReader(), []), notify=lambda uid: None)
    run.dir.mkdir()
    run.start()
    deadline = time.monotonic() + 5
    while (
        state(run.status()).get("waiting", {}).get("reason") != "ErrImagePull" and time.monotonic() < deadline
    ):
        time.sleep(0.05)
    waiting = state(run.status())["waiting"]
    assert waiting["reason"] == "ErrImagePull" and "local image table" in waiting["message"]
    assert run.status()["phase"] == "Pending"
    run.request_stop(0)
    assert run.wait(5)


def test_provider_after_restart_kills_leftovers_and_reports_failed(tmp_path):
    notified = []
    provider = ProcessProvider(tmp_path, RuntimeConfig(ImageTable(), DictReader(), []), notified.append)
    pod = make_pod([sh("main", "sleep 60")])
    leftover = subprocess.Popen(["sleep", "60"], start_new_session=True)
    d = provider.pod_dir(pod["metadata"]["uid"])
    d.mkdir(parents=True)
    (d / "run.json").write_text(json.dumps({"running": {"main": {"pid": leftover.pid, "create_time": 0}}}))
    pod["status"] = {
        "phase": "Running",
        "containerStatuses": [
            {"name": "main", "restartCount": 0, "state": {"running": {"startedAt": "2026-01-01T00:00:00Z"}}}
        ],
    }
    assert provider.previously_started(pod)
    provider.adopt_lost(pod)
    assert leftover.wait(5) == -9
    st = provider.get_pod_status(pod["metadata"]["uid"])
    assert (st["phase"], st["reason"]) == ("Failed", "NodeAgentRestarted")
    assert state(st)["terminated"]["reason"] == "ContainerStatusUnknown"
    assert notified == [pod["metadata"]["uid"]]
    fresh = make_pod([sh("main", "true")])
    assert not provider.previously_started(fresh)


def test_provider_serves_logs_of_running_container(tmp_path):
    provider = ProcessProvider(tmp_path, RuntimeConfig(ImageTable(), DictReader(), []), lambda uid: None)
    pod = make_pod([sh("main", "echo a; sleep 0.5; echo b")])
    provider.create_pod(pod)
    time.sleep(0.2)
    got = []
    t = threading.Thread(
        target=lambda: got.append(
            b"".join(provider.get_container_logs("ns", "p", "main", LogOptions(follow=True)))
        )
    )
    t.start()
    t.join(10)
    assert got == [b"a\nb\n"]
    with pytest.raises(LookupError):
        provider.get_container_logs("ns", "p", "main", LogOptions(previous=True))
