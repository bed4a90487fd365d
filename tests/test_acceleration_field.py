"""spec.training.acceleration: validation, the CRD's rule, and how it combines with the trainer's
diagnosis switches in the environment (which can only turn parts off)."""

import pytest
import yaml
from pydantic import ValidationError
from qlora_api import QLoRAJobSpec

BASE = {"model": {"uri": "s3://models/tiny/"}, "dataset": {"uri": "s3://data/train.jsonl"},
        "output": {"bucket": "adapters"}}


def _spec(acceleration: dict | None = None) -> QLoRAJobSpec:
    training = {} if acceleration is None else {"acceleration": acceleration}
    return QLoRAJobSpec.model_validate({**BASE, "training": training})


def test_the_fast_path_is_the_default_with_graphs_left_to_it():
    acc = _spec().training.acceleration
    assert acc.path == "fused" and acc.cuda_graphs is None


@pytest.mark.parametrize("acceleration", [{"path": "off"}, {"path": False}, {"path": "Fused"}, {"cudaGraphs": "maybe"},
                                          {"path": "plain", "cudaGraphs": True},
                                          {"path": "perProjection", "cudaGraphs": True}, {"fusedLayers": False},
                                          {"memory": "huge"}, {"memory": "Max"}, {"path": "plain", "memory": "max"},
                                          {"path": "plain", "memory": "lean"}])
def test_bad_settings_are_refused(acceleration):
    with pytest.raises(ValidationError):
        _spec(acceleration)


def test_graphs_can_be_turned_off_on_the_fused_path_and_named_off_elsewhere():
    assert _spec({"cudaGraphs": False}).training.acceleration.cuda_graphs is False
    assert _spec({"path": "plain", "cudaGraphs": False}).training.acceleration.path == "plain"


def test_the_crd_carries_the_field_and_its_rule():
    from pathlib import Path

    crd = yaml.safe_load((Path(__file__).parents[1] / "crds" / "training.qlora-operator.dev_qlorajobs.yaml").read_text())
    training = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["training"]
    acc = training["properties"]["acceleration"]
    assert acc["properties"]["path"]["enum"] == ["fused", "perProjection", "plain"]
    assert acc["properties"]["path"]["default"] == "fused"
    assert any("cudaGraphs applies to path fused only" == r["message"] for r in acc["x-kubernetes-validations"])
    assert acc["properties"]["memory"]["enum"] == ["auto", "lean", "max"]
    from qlora_trainer.acceleration.planner import MEMORY_POLICIES  # the API offers what the planner has

    assert tuple(acc["properties"]["memory"]["enum"]) == MEMORY_POLICIES
    assert acc["properties"]["memory"]["default"] == "auto"
    assert any(r["message"].startswith("memory applies to paths fused and perProjection only")
               for r in acc["x-kubernetes-validations"])


@pytest.mark.parametrize("acceleration,env,expected", [
    ({}, {}, ("fused", True, "spec.training.acceleration")),
    ({"cudaGraphs": False}, {}, ("fused", False, "spec.training.acceleration")),
    ({"path": "perProjection"}, {}, ("perProjection", False, "spec.training.acceleration")),
    ({"path": "plain"}, {}, ("plain", False, "spec.training.acceleration")),
    ({}, {"QLORA_ACCELERATION": "0"}, ("plain", False, "QLORA_ACCELERATION=0")),
    ({}, {"QLORA_FUSED_LAYER": "0"}, ("perProjection", False, "QLORA_FUSED_LAYER=0")),
    ({}, {"QLORA_CUDA_GRAPHS": "0"}, ("fused", False, "QLORA_CUDA_GRAPHS=0")),
    # the environment never turns on what the spec turned off
    ({"path": "plain"}, {"QLORA_ACCELERATION": "1", "QLORA_FUSED_LAYER": "1"}, ("plain", False, "spec.training.acceleration")),
    ({"path": "perProjection"}, {"QLORA_FUSED_LAYER": "1"}, ("perProjection", False, "spec.training.acceleration")),
    ({"cudaGraphs": False}, {"QLORA_CUDA_GRAPHS": "1"}, ("fused", False, "spec.training.acceleration")),
])
def test_the_spec_decides_and_the_environment_can_only_turn_parts_off(acceleration, env, expected):
    from qlora_trainer.acceleration.trainer_hooks import choose_acceleration

    choice = choose_acceleration(_spec(acceleration).training.acceleration, env)
    assert (choice.path, choice.cuda_graphs, choice.why) == expected


def test_a_bad_diagnosis_switch_is_refused():
    from qlora_trainer.acceleration.trainer_hooks import choose_acceleration

    with pytest.raises(ValueError, match="QLORA_FUSED_LAYER must be 0 or 1"):
        choose_acceleration(_spec().training.acceleration, {"QLORA_FUSED_LAYER": "no"})


def test_path_plain_makes_no_plan_and_the_plan_carries_the_graph_choice(tmp_path, monkeypatch):
    from qlora_trainer.acceleration.planner import FUSED_MAX_RANK
    from qlora_trainer.acceleration.trainer_hooks import plan_before_loading
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                vocab_size=128).save_pretrained(tmp_path)
    monkeypatch.setenv("QLORA_ACCELERATION", "cpu")
    assert plan_before_loading(tmp_path, _spec({"path": "plain"})) is None
    per_projection = plan_before_loading(tmp_path, _spec({"path": "perProjection"}))
    assert not per_projection.fused_layers and not per_projection.cuda_graphs
    no_graphs = plan_before_loading(tmp_path, _spec({"cudaGraphs": False}))
    assert no_graphs.fused_layers and not no_graphs.cuda_graphs
    assert "no CUDA graphs" in no_graphs.describe()
    assert plan_before_loading(tmp_path, _spec()).cuda_graphs
    # a rank above the fused layer's largest is planned as it will run: per projection, no graphs
    big = QLoRAJobSpec.model_validate({**BASE, "lora": {"r": FUSED_MAX_RANK + 1}})
    above = plan_before_loading(tmp_path, big)
    assert not above.fused_layers and not above.cuda_graphs
    at = plan_before_loading(tmp_path, QLoRAJobSpec.model_validate({**BASE, "lora": {"r": FUSED_MAX_RANK}}))
    assert at.fused_layers and at.cuda_graphs


def test_the_memory_policy_reaches_the_plan(tmp_path, monkeypatch):
    """spec.training.acceleration.memory is the planner's policy: on a pretend 80 GiB GPU, a
    Llama-3-8B-shaped job plans under the plain recipe's memory with auto, every layer recomputed
    with lean, and on the whole card with max (more memory, predicted faster); the plan says which
    policy it took, and auto and max name no other. The effective batch is the job's in all three."""
    from qlora_trainer.acceleration.trainer_hooks import plan_before_loading
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256).save_pretrained(tmp_path)
    monkeypatch.setenv("QLORA_ACCELERATION", "cpu")
    monkeypatch.setenv("QLORA_CPU_PLAN_GIB", "80")
    job = {"maxSeqLength": 1024, "batchSize": 4, "gradientAccumulationSteps": 1, "packing": False}

    def plan(memory):
        spec = QLoRAJobSpec.model_validate({**BASE, "training": {**job, "acceleration": {"memory": memory}}})
        return plan_before_loading(tmp_path, spec)

    auto, lean, most = plan("auto"), plan("lean"), plan("max")
    assert (auto.policy, lean.policy, most.policy) == ("auto", "lean", "max")
    assert {p.micro_batch * p.grad_accum for p in (auto, lean, most)} == {4}
    assert lean.recompute == "full" and lean.predicted_peak_bytes < auto.predicted_peak_bytes
    assert most.predicted_peak_bytes > auto.predicted_peak_bytes >= 0
    assert most.predicted_tokens_per_s > auto.predicted_tokens_per_s > lean.predicted_tokens_per_s
    assert auto.predicted_peak_bytes <= auto.budget_bytes < most.budget_bytes


def test_an_architecture_the_fused_layer_does_not_take_is_planned_per_projection(tmp_path, monkeypatch):
    """A GPT-NeoX job runs per projection whatever the plan says (fused_layer.fusable), so it is
    planned so: planned as fused, the H200 ran it 2.2x slower than the plain recipe at 1.3x its
    memory (benchmarks/results/neox_row_session20_h200.md). A Llama job keeps the fused plan."""
    from qlora_trainer.acceleration.trainer_hooks import plan_before_loading
    from transformers import GPTNeoXConfig, LlamaConfig

    monkeypatch.setenv("QLORA_ACCELERATION", "cpu")
    neox, llama = tmp_path / "neox", tmp_path / "llama"
    GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  vocab_size=128).save_pretrained(neox)
    LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                vocab_size=128).save_pretrained(llama)
    neox_plan = plan_before_loading(neox, _spec())
    assert not neox_plan.fused_layers and not neox_plan.cuda_graphs
    assert "fused decoder layers off" in neox_plan.describe()
    assert plan_before_loading(llama, _spec()).fused_layers
