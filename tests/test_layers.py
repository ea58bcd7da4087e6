"""Running a loaded model without some decoder layers: the same as deleting them, and restored exactly."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from shortgpt_serve.errors import ModelError
from shortgpt_serve.models.families import FAMILIES
from shortgpt_serve.models.layers import decoder_layers, remove_layers_in_memory, skipped_layers


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_skipped_layers_matches_removal_and_restores(make_tiny_model: Callable[..., Path], model_type: str) -> None:
    from transformers import AutoModelForCausalLM

    folder = make_tiny_model(model_type)
    family = FAMILIES[model_type]
    net = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(3))
    removed = [1, 4]

    def logits(m: Any) -> torch.Tensor:
        with torch.no_grad():
            return m(input_ids=ids, use_cache=False).logits

    layers = decoder_layers(net, family)
    config_before = net.config.to_dict()
    idx_before = [[m.layer_idx for m in layer.modules() if hasattr(m, "layer_idx")] for layer in layers]
    before = logits(net)

    with skipped_layers(net, family, removed):
        inside = logits(net)
        inside_config = net.config.to_dict()
        inside_idx = [m.layer_idx for m in decoder_layers(net, family).modules() if hasattr(m, "layer_idx")]
    fresh = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    remove_layers_in_memory(fresh, family, removed)
    assert torch.allclose(inside, logits(fresh), atol=1e-6, rtol=0)
    assert inside_config == fresh.config.to_dict() and inside_config["num_hidden_layers"] == 4
    assert inside_idx == [m.layer_idx for m in decoder_layers(fresh, family).modules() if hasattr(m, "layer_idx")]
    assert sorted(set(inside_idx)) == [0, 1, 2, 3]
    assert not torch.allclose(inside, before, atol=1e-3)

    def assert_restored() -> None:
        assert decoder_layers(net, family) is layers and len(layers) == 6
        assert [[m.layer_idx for m in layer.modules() if hasattr(m, "layer_idx")] for layer in layers] == idx_before
        assert net.config.to_dict() == config_before
        assert torch.equal(logits(net), before)

    assert_restored()
    with pytest.raises(RuntimeError, match="boom"), skipped_layers(net, family, removed):
        assert len(decoder_layers(net, family)) == 4
        raise RuntimeError("boom")
    assert_restored()
    with pytest.raises(ModelError, match="do not exist"), skipped_layers(net, family, [6]):
        pass
    assert_restored()


def test_skipped_layers_cuts_per_layer_config(make_tiny_model: Callable[..., Path]) -> None:
    from transformers import AutoModelForCausalLM

    net = AutoModelForCausalLM.from_pretrained(make_tiny_model("qwen2"), dtype=torch.float32).eval()
    types = list(net.config.layer_types)
    assert len(set(types)) == 2  # mixed sliding and full attention
    with skipped_layers(net, FAMILIES["qwen2"], [0, 5]):
        assert net.config.layer_types == types[1:5]
        assert net.config.max_window_layers == 2  # layers 1 and 2 of the first 3 remain before the window starts
    assert net.config.layer_types == types
