"""Property: the pydantic models (the one source of truth) and the API server, judging the CRD
generated from them, agree on every spec. Hypothesis generates specs around a valid one, with
fields replaced by values of the wrong type, out of range, or strings of any Unicode (control
characters, slashes and dots, shell metacharacters); each batch is judged by the real API server
through server-side dry runs, sent concurrently to stay fast.

    .venv/bin/pytest tests/test_spec_properties.py
"""

import copy
import json
from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError
from qlora_api import GROUP, KIND, PLURAL, VERSION, QLoRAJobSpec
from support.operator_process import install_crd_and_rbac

pytestmark = pytest.mark.cluster

BASE = {
    "model": {"uri": "s3://models/tiny/"},
    "dataset": {"uri": "s3://datasets/train.jsonl"},
    "output": {"bucket": "adapters", "credentialsSecretRef": {"name": "s3"}},
}
# Text that exercises the patterns: path characters, dots, shell metacharacters, spaces, control
# characters and any other Unicode (no lone surrogates: they cannot travel as UTF-8).
TRICKY = "abz09AZ./-_:;$`|&*?~%@ \t\n\x00\x7f\u00a0\u202e\u0435\u00e9"
text = st.one_of(st.text(alphabet=TRICKY, max_size=24),
                 st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=12))
wrong_type = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.floats(-2, 2, allow_nan=False),
                       st.just([]), st.just({}))


def uri(*schemes: str):
    return st.builds(lambda s, rest: s + rest, st.sampled_from(schemes), text)


FIELDS = {  # (section, field) -> values to try
    ("lora", "r"): st.one_of(st.integers(-2, 1100), wrong_type),
    ("lora", "alpha"): st.integers(-2, 5000),
    ("lora", "dropout"): st.one_of(st.floats(-0.5, 1.5, allow_nan=False), wrong_type),
    ("lora", "targetModules"): st.one_of(st.lists(text, max_size=3), wrong_type,
                                         st.just(["all-linear", "q_proj"])),
    ("lora", "bias"): st.one_of(st.sampled_from(["none", "all", "lora_only", "some"]), wrong_type),
    ("training", "maxSeqLength"): st.one_of(st.integers(0, 300_000), wrong_type),
    ("training", "learningRate"): st.one_of(st.floats(-1, 2, allow_nan=False), wrong_type),
    ("training", "warmupRatio"): st.floats(-0.2, 0.8, allow_nan=False),
    ("training", "epochs"): st.one_of(st.floats(-1, 1200, allow_nan=False), wrong_type),
    ("model", "uri"): st.one_of(uri("s3://", "hf://", "pvc://", "https://", "s3://models/", "pvc://claim/"), text),
    ("model", "revision"): text,
    ("dataset", "uri"): st.one_of(uri("s3://datasets/", "https://", "pvc://data/", "hf://"), text),
    ("dataset", "evalFraction"): st.floats(-0.2, 0.8, allow_nan=False),
    ("output", "bucket"): text,
    ("output", "prefix"): st.one_of(text, st.sampled_from(["a/../b", "./x", "..", "/abs", "a/.", "a.b/..c"])),
    ("output", "region"): text,
    ("output", "endpointUrl"): uri("http://", "https://", "ftp://"),
    ("resources", "image"): text,
    ("resources", "gpu"): st.fixed_dictionaries({"count": st.integers(-1, 20)}, optional={"product": text}),
    ("resources", "nodeSelector"): st.dictionaries(st.sampled_from(["pool", "zone"]), text, max_size=2),
    ("resources", "tolerations"): st.lists(st.fixed_dictionaries({}, optional={
        "key": st.one_of(text, st.just("gpu")), "operator": st.sampled_from(["Exists", "Equal", "In"]),
        "value": text, "effect": st.sampled_from(["NoSchedule", "NoExecute"]),
        "tolerationSeconds": st.integers(0, 10)}), max_size=2),
    ("top", "backoffLimit"): st.one_of(st.integers(-1, 25), wrong_type),
    ("top", "activeDeadlineSeconds"): st.integers(-1, 5),
}


@st.composite
def specs(draw) -> dict:
    spec = copy.deepcopy(BASE)
    for section, field in draw(st.lists(st.sampled_from(sorted(FIELDS)), min_size=1, max_size=3, unique=True)):
        value = draw(FIELDS[(section, field)])
        target = spec if section == "top" else spec.setdefault(section, {})
        target[field] = value
    return spec


def without_nulls(value):
    """The API server drops a null field that is not nullable before it validates (and defaults
    it): `bias: null` means what leaving bias out means."""
    if isinstance(value, dict):
        return {k: without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [without_nulls(v) for v in value]
    return value


def pydantic_accepts(spec: dict) -> bool:
    try:
        QLoRAJobSpec.model_validate_json(json.dumps(without_nulls(spec)), strict=True)
    except ValidationError:
        return False
    return True


@pytest.fixture(scope="module")
def api(local_cluster):
    install_crd_and_rbac(local_cluster)
    return client.CustomObjectsApi(config.new_client_from_config(str(local_cluster.kubeconfig)))


def server_accepts(api, index: int, spec: dict) -> tuple[bool, str]:
    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "metadata": {"name": f"prop-{index}"}, "spec": spec}
    try:
        api.create_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, body, dry_run="All",
                                            field_validation="Strict")
    except ApiException as e:
        if e.status in (400, 422):
            return False, json.loads(e.body).get("message", "")[:400]
        raise
    return True, ""


def test_the_models_and_the_api_server_agree_on_generated_specs(api):
    pool = ThreadPoolExecutor(8)

    @settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(st.lists(specs(), min_size=25, max_size=25))
    def agree(batch):
        verdicts = list(pool.map(lambda item: server_accepts(api, *item), enumerate(batch)))
        disagreements = [(spec, said) for spec, (accepted, said) in zip(batch, verdicts)
                         if accepted != pydantic_accepts(spec)]
        assert not disagreements, json.dumps(disagreements[0], ensure_ascii=True)[:1500]

    try:
        agree()
    finally:
        pool.shutdown()
