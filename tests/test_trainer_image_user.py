"""The trainer runs as the trainer image's user: uid/gid 10001 (the pod's runAsUser), the image's
own environment, and nothing writable but its home and the /tmp stand-in, fine-tunes the tiny
model and publishes the adapter to S3. No container engine: the CUDA image is not built here, so
the Dockerfile's ENV lines and the pod's arguments are replayed around this checkout's trainer."""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from qlora_api.protocol import CONFIG_PATH, TERMINATION_MESSAGE_PATH
from qlora_operator.rendering import TRAINER_UID
from trainer_fixtures.fixtures import colour_data, s3, tiny_model_dir, tiny_model_uri  # noqa: F401
from trainer_fixtures.runs import run_config

pytestmark = pytest.mark.slow
DOCKERFILE = Path(__file__).resolve().parents[1] / "trainer_image" / "Dockerfile"


def image_env() -> dict[str, str]:
    """The ENV set after the Dockerfile's USER line: the environment the trainer runs with."""
    return dict(re.findall(r"(\w+)=(\S+)", DOCKERFILE.read_text().split("\nUSER ", 1)[1].split("\nWORKDIR")[0]))


@pytest.fixture
def pod_root():
    """A folder other users can enter (pytest's own tmp_path is private to root)."""
    root = Path(tempfile.mkdtemp(prefix="qlora-trainer-user-"))
    root.chmod(0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def owned_by_trainer(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, TRAINER_UID, TRAINER_UID)
    return path


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv to drop to uid 10001")
def test_the_trainer_trains_and_publishes_as_the_images_user(s3, tiny_model_uri, colour_data, pod_root):  # noqa: F811
    as_trainer = ["setpriv", f"--reuid={TRAINER_UID}", f"--regid={TRAINER_UID}", "--clear-groups", sys.executable]
    if subprocess.run([*as_trainer, "-c", "import qlora_trainer"], capture_output=True).returncode != 0:
        pytest.skip(f"this checkout or its virtualenv is not readable by uid {TRAINER_UID}")
    tmp, home = owned_by_trainer(pod_root / "tmp"), owned_by_trainer(pod_root / "home")
    env = {k: v.replace("/tmp", str(tmp)) for k, v in image_env().items()}
    assert env.pop("HOME") == "/home/trainer"  # the user's home, made by useradd; its stand-in:
    env.update(HOME=str(home), TMPDIR=str(tmp), PATH=os.environ["PATH"], HF_HUB_OFFLINE="1",
               PYTHONPATH=os.environ.get("PYTHONPATH", ""), **s3.env)
    # The pod's files: the ConfigMap (read-only, root's) and the termination log the kubelet provides.
    config = pod_root / "etc" / "config.json"
    config.parent.mkdir()
    config.write_text(json.dumps(run_config(s3, tiny_model_uri, colour_data["train"], "as-uid-10001",
                                            training={"maxSteps": 4, "checkpointSteps": 2, "loggingSteps": 2})))
    termination = pod_root / "termination-log"
    termination.touch()
    os.chown(termination, TRAINER_UID, TRAINER_UID)
    args = [arg.replace(CONFIG_PATH, str(config)).replace(TERMINATION_MESSAGE_PATH, str(termination))
            for arg in ["--config", CONFIG_PATH, "--termination-log", TERMINATION_MESSAGE_PATH]]

    proc = subprocess.run([*as_trainer, "-m", "qlora_trainer", *args],
                          env=env, cwd=tmp, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(termination.read_text())
    assert result["result"]["adapterUri"].endswith("/as-uid-10001/")
    assert any(key.endswith("adapter_model.safetensors") for key in s3.keys("adapters", "adapters/team-a/colours/as-uid-10001/"))
    # It did write its caches and scratch: where the image points them, as that user.
    written = [p for p in tmp.rglob("*")]
    assert written and all(p.stat().st_uid == TRAINER_UID for p in written)
