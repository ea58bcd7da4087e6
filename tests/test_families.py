"""Model families: which configs are accepted, and how per-layer config is cut with the layers (pure dicts)."""

from __future__ import annotations

from typing import Any

import pytest

from shortgpt_serve.errors import ModelError
from shortgpt_serve.models.families import (
    FAMILIES,
    derived_layer_types,
    family_for,
    renumber_module,
    shortened_config,
    shortened_quantization_config,
    sparse_layers,
)


def config(model_type: str = "llama", n: int = 6) -> dict[str, Any]:
    return {"model_type": model_type, "architectures": ["SomeForCausalLM"], "num_hidden_layers": n}


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        ({"model_type": "llama", "architectures": ["LlamaModel"], "num_hidden_layers": 2}, "not a causal language"),
        ({"model_type": "llama", "num_hidden_layers": 2}, r"architectures: none"),
        ({"model_type": "bert", "architectures": ["BertForCausalLM"], "num_hidden_layers": 2}, "'bert'.*supported"),
        ({"model_type": "llama", "architectures": ["LlamaForCausalLM"], "num_hidden_layers": "6"}, "no integer"),
    ],
    ids=["not causal", "no architectures", "unsupported", "layer count not an integer"],
)
def test_family_for_refuses_what_cannot_be_shortened(cfg: dict[str, Any], message: str) -> None:
    with pytest.raises(ModelError, match=message):
        family_for(cfg, "m")


def test_family_for_accepts_every_known_family() -> None:
    for model_type, family in FAMILIES.items():
        assert family_for(config(model_type), "m") is family
    assert FAMILIES["qwen3_moe"].moe_step and not FAMILIES["llama"].moe_step
    assert FAMILIES["gemma3_text"].implicit_layer_types


def test_sparse_layers_follow_the_qwen_moe_rule() -> None:
    cfg = config("qwen2_moe") | {"num_experts": 4, "decoder_sparse_step": 2, "mlp_only_layers": [3]}
    assert sparse_layers(cfg) == [False, True, False, False, False, True]
    assert sparse_layers({**cfg, "num_experts": 0}) == [False] * 6  # no experts: all dense
    assert sparse_layers({"num_hidden_layers": 2, "num_local_experts": 2}) == [True, True]


def test_moe_rule_is_written_out_after_renumbering() -> None:
    cfg = config("qwen2_moe") | {"num_experts": 4, "decoder_sparse_step": 2, "mlp_only_layers": [3]}
    out = shortened_config(cfg, [0, 1])
    assert out["num_hidden_layers"] == 4 and out["decoder_sparse_step"] == 1
    kept_sparse = [sparse_layers(cfg)[i] for i in (2, 3, 4, 5)]
    assert sparse_layers(out) == kept_sparse == [False, False, False, True]
    assert cfg["mlp_only_layers"] == [3] and cfg["num_hidden_layers"] == 6  # the input is not changed


def test_per_layer_lists_are_cut_and_index_lists_renumbered() -> None:
    cfg = config(n=4) | {
        "layer_types": ["a", "b", "c", "d"],
        "no_rope_layers": [1, 0, 1, 0],
        "moe_layers": [0, 2, 3],
        "rope_theta": 10000.0,
    }
    out = shortened_config(cfg, [2])
    assert out["layer_types"] == ["a", "b", "d"]
    assert out["no_rope_layers"] == [1, 0, 0]
    assert out["moe_layers"] == [0, 2]
    assert out["rope_theta"] == 10000.0


def test_max_window_layers_keeps_the_same_layers_windowed() -> None:
    cfg = config("qwen2") | {"max_window_layers": 3, "layer_types": ["full_attention"] * 3 + ["sliding_attention"] * 3}
    out = shortened_config(cfg, [0, 4])
    assert out["max_window_layers"] == 2  # layers 1 and 2 stay below it, 3 and 5 above
    assert out["layer_types"] == ["full_attention", "full_attention", "sliding_attention", "sliding_attention"]


def test_explicit_layer_types_are_taken_as_they_are() -> None:
    assert derived_layer_types(config(n=2) | {"layer_types": ["x", "y"]}) == ["x", "y"]


def test_renumber_module() -> None:
    new_index = {0: 0, 2: 1}
    assert renumber_module("model.layers.2.mlp", "model.layers", new_index) == "model.layers.1.mlp"
    assert renumber_module("model.layers.2", "model.layers", new_index) == "model.layers.1"
    assert renumber_module("model.layers.1.mlp", "model.layers", new_index) is None  # removed
    assert renumber_module("lm_head", "model.layers", new_index) == "lm_head"
    assert renumber_module("model.layers_x.2", "model.layers", new_index) == "model.layers_x.2"


def test_quantization_config_naming_layers_by_number_in_dynamic_is_refused() -> None:
    qconfig = {"dynamic": {r"+:.*layers\.1\..*": {"bits": 8}}}
    with pytest.raises(ModelError, match="dynamic names layers by number"):
        shortened_quantization_config(qconfig, "model.layers", {0: 0}, 2)
    kept = shortened_quantization_config({"skip_modules": ["model.layers.1.mlp", 7]}, "model.layers", {1: 0}, 2)
    assert kept["skip_modules"] == ["model.layers.0.mlp", 7]
