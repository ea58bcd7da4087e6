"""Quantized checkpoints are shortened without dequantizing (ShortGPT is orthogonal to quantization)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from shortgpt_serve.checkpoint import write_checkpoint
from shortgpt_serve.models.families import FAMILIES
from shortgpt_serve.models.layers import remove_layers_in_memory
from shortgpt_serve.models.source import resolve_model


def test_w8a8_checkpoint_is_shortened_as_it_is(w8a8_model: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    source = resolve_model(str(w8a8_model), tmp_path / "cache")
    out = write_checkpoint(source, [1, 4], tmp_path / "short")

    with safe_open(w8a8_model / "model.safetensors", "pt") as f:
        src_keys = set(f.keys())
    with safe_open(out / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("model.layers.0.self_attn.q_proj.weight").dtype == torch.int8  # still int8
        assert "model.layers.0.self_attn.q_proj.weight_scale" in keys
    per_layer = {k.split(".", 3)[3] for k in src_keys if k.startswith("model.layers.0.")}
    assert len(keys) == len(src_keys) - 2 * len(per_layer)
    assert {int(k.split(".")[2]) for k in keys if k.startswith("model.layers.")} == {0, 1, 2, 3}
    qconfig = json.loads((out / "config.json").read_text())["quantization_config"]
    # Layer 3's down_proj stays unquantized; after removing layers 1 and 4 it is layer 2's.
    assert sorted(qconfig["ignore"]) == ["lm_head", "model.layers.2.mlp.down_proj"]
    with safe_open(out / "model.safetensors", "pt") as f:
        assert f.get_tensor("model.layers.2.mlp.down_proj.weight").dtype == torch.bfloat16
        assert "model.layers.2.mlp.down_proj.weight_scale" not in keys

    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    short = AutoModelForCausalLM.from_pretrained(out).eval()
    reference = AutoModelForCausalLM.from_pretrained(w8a8_model).eval()
    remove_layers_in_memory(reference, FAMILIES["llama"], [1, 4])
    with torch.no_grad():
        assert torch.equal(
            short(input_ids=ids, use_cache=False).logits, reference(input_ids=ids, use_cache=False).logits
        )
