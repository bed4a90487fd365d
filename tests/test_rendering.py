"""render_config_map / render_trainer_job: what the trainer pod gets. No server."""

import json
import re
from pathlib import Path

from qlora_api import TrainerRunConfig
from qlora_api.protocol import CONFIG_MOUNT_DIR, CONFIG_PATH, TERMINATION_MESSAGE_PATH
from qlora_operator.naming import config_map_name, trainer_job_name
from qlora_operator.rendering import TRAINER_UID, render_config_map, render_trainer_job
from support.objects import FULL_RESOURCES, qlorajob


def render(spec=None, attempt=1, deadline=None, **kw):
    return render_trainer_job(qlorajob(spec=spec, **kw), attempt, default_image="trainer:default",
                              active_deadline_seconds=deadline)


def pod_spec(job):
    return job["spec"]["template"]["spec"]


def trainer(job):
    (container,) = pod_spec(job)["containers"]
    return container


def test_the_config_map_holds_the_run_config_with_the_uid_as_run_id():
    job = qlorajob(spec={"lora": {"r": 8}})
    cm = render_config_map(job, 3)
    config = TrainerRunConfig.model_validate(json.loads(cm["data"]["config.json"]))
    assert config.run_id == job.uid and config.attempt == 3
    assert (config.namespace, config.name) == ("ml", "demo")
    assert config.spec == job.spec and config.spec.lora.r == 8
    assert cm["immutable"] is True
    assert cm["metadata"]["ownerReferences"][0]["uid"] == job.uid


def test_every_attempt_resumes_the_same_run():
    job = qlorajob()
    ids = {json.loads(render_config_map(job, n)["data"]["config.json"])["runId"] for n in (1, 2, 3)}
    assert ids == {job.uid}


def test_the_job_is_one_try_owned_by_the_qlorajob_and_ignores_disruptions():
    job = render(attempt=2)
    assert job["metadata"]["name"] == "demo-2"
    assert job["spec"]["backoffLimit"] == 0
    rules = job["spec"]["podFailurePolicy"]["rules"]
    assert {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]} in rules
    owner = job["metadata"]["ownerReferences"][0]
    assert owner["kind"] == "QLoRAJob" and owner["controller"] is True and owner["blockOwnerDeletion"] is True
    labels = job["spec"]["template"]["metadata"]["labels"]
    assert labels["training.qlora-operator.dev/qlorajob"] == "demo"
    assert labels["training.qlora-operator.dev/attempt"] == "2"
    assert pod_spec(job)["restartPolicy"] == "Never"


def test_the_trainer_pod_holds_no_kubernetes_credentials_and_reports_through_its_termination_message():
    job = render()
    assert pod_spec(job)["automountServiceAccountToken"] is False
    c = trainer(job)
    assert c["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert c["terminationMessagePath"] == TERMINATION_MESSAGE_PATH
    assert c["args"] == ["--config", CONFIG_PATH, "--termination-log", TERMINATION_MESSAGE_PATH]
    assert "command" not in c  # the image's ENTRYPOINT is the trainer
    assert c["volumeMounts"] == [{"name": "config", "mountPath": CONFIG_MOUNT_DIR, "readOnly": True}]
    assert pod_spec(job)["volumes"] == [{"name": "config", "configMap": {"name": "demo-1-config"}}]


def test_the_trainer_runs_unprivileged_as_the_images_own_user():
    spec, c = pod_spec(render()), trainer(render())
    assert spec["securityContext"] == {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001,
                                       "seccompProfile": {"type": "RuntimeDefault"}}
    assert c["securityContext"] == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
    # A custom image (spec.resources.image) gets the same context: nothing in the spec can widen it.
    custom = render(spec={"resources": FULL_RESOURCES})
    assert pod_spec(custom)["securityContext"] == spec["securityContext"]
    assert trainer(custom)["securityContext"] == c["securityContext"]


def test_s3_credentials_come_from_the_secret_as_environment():
    job = render(spec={"output": {"credentialsSecretRef": {"name": "s3", "accessKeyIdKey": "id",
                                                             "secretAccessKeyKey": "key", "sessionTokenKey": "tok"}}})
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in trainer(job)["env"]}
    assert env == {"AWS_ACCESS_KEY_ID": {"name": "s3", "key": "id"},
                   "AWS_SECRET_ACCESS_KEY": {"name": "s3", "key": "key"},
                   "AWS_SESSION_TOKEN": {"name": "s3", "key": "tok"}}


def test_without_a_secret_the_pod_uses_ambient_credentials():
    job = render(spec={"output": {"credentialsSecretRef": None}})
    assert trainer(job)["env"] == []


def test_defaults_ask_for_one_gpu_and_tolerate_gpu_nodes():
    job = render()
    c = trainer(job)
    assert c["image"] == "trainer:default"
    assert c["resources"] == {"requests": {"nvidia.com/gpu": "1"}, "limits": {"nvidia.com/gpu": "1"}}
    assert pod_spec(job)["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert "nodeSelector" not in pod_spec(job)


def test_where_and_how_the_pod_runs_comes_from_spec_resources():
    job = render(spec={"resources": FULL_RESOURCES})
    spec, c = pod_spec(job), trainer(job)
    assert c["image"] == "registry.example/custom-trainer:2" and c["imagePullPolicy"] == "Always"
    assert c["resources"] == {"requests": {"nvidia.com/gpu": "2", "memory": "64Gi", "cpu": "8"},
                              "limits": {"nvidia.com/gpu": "2", "memory": "64Gi"}}
    assert spec["nodeSelector"] == {"pool": "training", "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert spec["tolerations"][0] == {"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}
    assert spec["tolerations"][1]["key"] == "nvidia.com/gpu"
    assert spec["affinity"] == FULL_RESOURCES["affinity"]
    assert spec["priorityClassName"] == "training-low" and spec["runtimeClassName"] == "nvidia"
    assert spec["imagePullSecrets"] == [{"name": "regcred"}]


def test_the_gpu_toleration_is_not_doubled():
    own = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    job = render(spec={"resources": {"tolerations": [own]}})
    assert pod_spec(job)["tolerations"] == [own]


def test_suspend_and_deadline_are_mirrored():
    job = render(spec={"suspend": True}, deadline=1234)
    assert job["spec"]["suspend"] is True and job["spec"]["activeDeadlineSeconds"] == 1234
    assert "activeDeadlineSeconds" not in render()["spec"]


def test_long_names_fit_label_limits_and_stay_distinct():
    base = "x" * 70
    a, b = trainer_job_name(base + "a", 12), trainer_job_name(base + "b", 12)
    assert len(a) <= 63 and len(b) <= 63 and a != b
    assert a.endswith("-12") and a == trainer_job_name(base + "a", 12)
    assert len(config_map_name(base, 3)) <= 63
    job = render(name="y" * 80)
    assert all(len(v) <= 63 for v in job["spec"]["template"]["metadata"]["labels"].values())
    assert job["spec"]["template"]["metadata"]["annotations"]["training.qlora-operator.dev/qlorajob-name"] == "y" * 80


def test_the_trainer_images_user_is_the_uid_the_pod_runs_as_and_its_caches_are_writable_paths():
    dockerfile = (Path(__file__).resolve().parents[1] / "trainer_image" / "Dockerfile").read_text()
    assert f"useradd --uid {TRAINER_UID} --gid {TRAINER_UID}" in dockerfile
    assert f"groupadd --gid {TRAINER_UID}" in dockerfile
    assert f"\nUSER {TRAINER_UID}:{TRAINER_UID}\n" in dockerfile
    env = dict(re.findall(r"(\w+)=(\S+)", dockerfile.split("\nUSER ", 1)[1].split("WORKDIR")[0]))
    # Where the libraries write: the user's own home, or /tmp (an emptyDir under a read-only root).
    assert env["HOME"] == "/home/trainer"
    for var in ("HF_HOME", "XDG_CACHE_HOME", "TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR"):
        assert env[var].startswith("/tmp/"), var
