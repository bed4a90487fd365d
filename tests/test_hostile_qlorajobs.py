"""The hostile corpus (tests/hostile_qlorajobs/*.yaml, 78 QLoRAJobs): wrong types, out-of-range
values, missing fields, huge strings, shell metacharacters and look-alike Unicode, traversal in
URIs and prefixes, Secret references that try to leave the namespace, names that derived names
could not hold, target modules and lengths the model does not have.

Each says in its `qlora-test.dev/expect` annotation what must happen:
  refused: <text>   the API server refuses it at admission, and its message names the field;
                    the pydantic models (the CRD's source) refuse the same spec;
  failed: <Reason>  it is admitted and ends Failed with that reason, without a retry;
  succeeded         it looks hostile but is legal, and the operator makes legal children for it.
Meanwhile a well-behaved job trains and succeeds, and the operator neither crashes nor logs a
traceback.

    .venv/bin/pytest tests/test_hostile_qlorajobs.py
"""

import json
import time
from pathlib import Path

import pytest
import yaml
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError
from qlora_api import GROUP, PLURAL, VERSION, QLoRAJobSpec
from qlora_localcluster.testing import kubectl
from support.cluster_s3 import TRAINER_IMAGE, credentials_secret, upload_tiny_model_and_data
from support.operator_process import OperatorProcess, install_crd_and_rbac, service_account_kubeconfig
from support.polling import qlorajob_status
from support.shared_gpu import wait_for_the_gpu

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
CORPUS = Path(__file__).parent / "hostile_qlorajobs"
EXPECT = "qlora-test.dev/expect"
LABEL = "training.qlora-operator.dev/qlorajob"


def corpus() -> list[dict]:
    return [doc for path in sorted(CORPUS.glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text())]


def expectation(doc: dict) -> tuple[str, str]:
    kind, _, detail = doc["metadata"]["annotations"][EXPECT].partition(":")
    return kind, detail.strip()


def test_the_corpus_is_large_and_every_entry_says_what_must_happen():
    docs = corpus()
    assert len(docs) >= 60
    assert len({d["metadata"]["name"] for d in docs}) == len(docs)
    assert {expectation(d)[0] for d in docs} == {"refused", "failed", "succeeded"}


@pytest.mark.parametrize("doc", [d for d in corpus() if expectation(d)[0] != "refused"
                                 or not expectation(d)[1].startswith("metadata.")],
                         ids=lambda d: d["metadata"]["name"][:40])
def test_the_pydantic_models_judge_each_spec_as_the_corpus_says(doc):
    """The CRD is generated from these models: what the API server refuses, they refuse too."""
    kind, _ = expectation(doc)
    if "spec" not in doc:
        return  # nothing for the models to judge; the API server requires spec
    # Strict JSON validation, as the API server types JSON: "yes" is not a boolean, 1.5 not an integer.
    text = json.dumps(doc["spec"])
    if kind == "refused":
        with pytest.raises(ValidationError):
            QLoRAJobSpec.model_validate_json(text, strict=True)
    else:
        QLoRAJobSpec.model_validate_json(text, strict=True)


@pytest.fixture
def api(local_cluster):
    return client.CustomObjectsApi(config.new_client_from_config(str(local_cluster.kubeconfig)))


def create(api, namespace: str, doc: dict) -> ApiException | None:
    body = json.loads(json.dumps(doc))
    body["metadata"]["namespace"] = namespace
    try:
        api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body, field_validation="Strict")
    except ApiException as e:
        return e
    return None


def aimed_at_the_cluster(doc: dict, endpoint: str) -> dict:
    doc = json.loads(json.dumps(doc))
    spec = doc.get("spec")
    output = spec.get("output") if isinstance(spec, dict) else None
    if isinstance(output, dict):
        output.setdefault("endpointUrl", endpoint)
    return doc


def failed_reason(current: dict) -> str | None:
    return next((c["reason"] for c in current.get("conditions", []) if c["type"] == "Failed"
                 and c["status"] == "True"), None)


def test_every_hostile_qlorajob_is_refused_or_fails_with_its_reason_while_another_job_trains(
        local_cluster, namespace, api, tmp_path):
    wait_for_the_gpu(local_cluster)
    upload_tiny_model_and_data(local_cluster, tmp_path / "tiny-base")
    install_crd_and_rbac(local_cluster)
    credentials_secret(local_cluster, namespace)
    kubeconfig = service_account_kubeconfig(local_cluster, tmp_path / "operator.kubeconfig")
    operator = OperatorProcess(kubeconfig, namespace, tmp_path / "operator.log", trainer_image=TRAINER_IMAGE).start()
    try:
        # A well-behaved job, training while the corpus arrives.
        bystander = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "QLoRAJob", "metadata": {"name": "bystander"},
                     "spec": {"model": {"uri": "hf://fake/succeed"}, "dataset": {"uri": "s3://datasets/x.jsonl"},
                              "output": {"bucket": "adapters"}, "training": {"maxSteps": 30},
                              "resources": {"image": "qlora-fake-trainer:test"}}}
        assert create(api, namespace, bystander) is None
        started = time.monotonic()
        while (qlorajob_status(local_cluster, namespace, "bystander").get("progress") or {}).get("step", 0) < 1:
            assert time.monotonic() - started < 120, operator.log_tail()
            time.sleep(0.5)

        docs = [aimed_at_the_cluster(d, local_cluster.s3_endpoint) for d in corpus()]
        wrong = []
        for doc in docs:
            kind, detail = expectation(doc)
            refusal = create(api, namespace, doc)
            if kind == "refused":
                said = json.loads(refusal.body).get("message", "") if refusal is not None else ""
                if refusal is None or refusal.status not in (400, 422) or detail not in said:
                    wrong.append(f"{doc['metadata']['name']}: expected a refusal naming {detail!r}, got "
                                 f"{refusal.status if refusal else 'admitted'}: {said[:300]}")
            elif refusal is not None:
                wrong.append(f"{doc['metadata']['name']}: expected admission, got {refusal.status}: {refusal.body[:300]}")
        assert not wrong, "\n".join(wrong)

        admitted = {d["metadata"]["name"]: expectation(d) for d in docs if expectation(d)[0] != "refused"}
        deadline = time.monotonic() + 600
        outcomes: dict[str, dict] = {}
        while len(outcomes) < len(admitted) and time.monotonic() < deadline:
            for name in admitted.keys() - outcomes.keys():
                current = qlorajob_status(local_cluster, namespace, name)
                if current.get("phase") in ("Failed", "Succeeded"):
                    outcomes[name] = current
            assert operator.proc.poll() is None, operator.log_tail()
            time.sleep(1)
        for name, (kind, reason) in admitted.items():
            current = outcomes.get(name)
            assert current is not None, f"{name} did not finish: {qlorajob_status(local_cluster, namespace, name)}"
            if kind == "failed":
                assert failed_reason(current) == reason, (name, current)
                assert (current.get("attempts") or 0) <= 1, (name, current)  # a permanent failure: no retry
            else:
                assert current["phase"] == "Succeeded", (name, current)
        jobs = json.loads(kubectl(local_cluster, "-n", namespace, "get", "jobs", "-o", "json").stdout)["items"]
        assert all(len(j["metadata"]["name"]) <= 63 for j in jobs)
        assert not any(j["metadata"]["name"].startswith(("affinity-garbage", "selector-key-bang")) for j in jobs)

        assert qlorajob_status(local_cluster, namespace, "bystander")["phase"] == "Succeeded"
        assert operator.proc.poll() is None and operator.errors_in_log() == [], operator.log_tail()
    finally:
        kubectl(local_cluster, "-n", namespace, "delete", "qlorajobs", "--all", "--wait=false", check=False)
        operator.stop()
