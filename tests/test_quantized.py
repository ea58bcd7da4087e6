"""Quantized checkpoints are shortened without dequantizing (ShortGPT is orthogonal to quantization)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from shortgpt_serve.checkpoint import write_checkpoint
from shortgpt_serve.errors import ModelError
from shortgpt_serve.models.families import FAMILIES
from shortgpt_serve.models.layers import remove_layers_in_memory
from shortgpt_serve.models.source import resolve_model
from shortgpt_serve.selection import CostModel
from tests.conftest import VLLM_TINY, compressed_tensors_checkpoint, tiny_config


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


# --- the cost model counts logical parameters: a quantized checkpoint has its unquantized twin's ------------------


def cost_of(folder: Path) -> CostModel:
    config = json.loads((folder / "config.json").read_text())
    return CostModel.from_checkpoint(folder, config, "model.layers", context=0)


def assert_same_cost(quantized: Path, twin: Path) -> None:
    q, t = cost_of(quantized), cost_of(twin)
    assert (q.layer_params, q.other_params) == (t.layer_params, t.other_params)
    assert q.layer_flops == t.layer_flops and q.head_flops == t.head_flops


def test_w8a8_counts_its_unquantized_twins_parameters(w8a8_model: Path, make_tiny_model: Callable[..., Path]) -> None:
    assert_same_cost(w8a8_model, make_tiny_model("llama", **VLLM_TINY))


def test_packed_w4a16_counts_its_unquantized_twins_parameters(
    make_tiny_model: Callable[..., Path], tmp_path: Path
) -> None:
    """compressed-tensors pack-quantized: eight int4 weights per int32 in ``weight_packed``, ``weight_shape`` beside."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", **W4_SHAPES)).to(torch.bfloat16)
    folder = compressed_tensors_checkpoint(model, "W4A16", ["lm_head"], "pack-quantized", tmp_path / "w4a16")
    with safe_open(folder / "model.safetensors", "pt") as f:
        packed = f.get_slice("model.layers.0.mlp.down_proj.weight_packed")
        assert packed.get_dtype() == "I32" and packed.get_shape() == [256, 512 // 8]
    assert_same_cost(folder, make_tiny_model("llama", **W4_SHAPES))


W4_SHAPES: dict[str, object] = {"hidden_size": 256, "intermediate_size": 512, "head_dim": 64}
"""Input features a multiple of 128: W4A16's group size."""
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def int4_groups(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric min-max int4 of ``w`` [out, in] per ``group`` input columns: codes [out, in], scale and zero
    point [out, in / group]."""
    out_f, in_f = w.shape
    g = w.float().reshape(out_f, in_f // group, group)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-8)
    zero = torch.round(-lo / scale).clamp(0, 15)
    codes = (torch.round(g / scale[..., None]) + zero[..., None]).clamp(0, 15).reshape(out_f, in_f)
    return codes, scale, zero


def pack_int4(codes: torch.Tensor, dim: int) -> torch.Tensor:
    """int32 words of eight 4-bit codes along ``dim``."""
    q = codes.to(torch.int64).movedim(dim, 0)
    words = sum(q[k::8] << (4 * k) for k in range(8))
    assert isinstance(words, torch.Tensor)
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32).movedim(0, dim)


def int4_checkpoint(twin: Path, out: Path, method: str, qconfig: dict[str, object], group: int = 16) -> Path:
    """``twin``'s decoder linears quantized to int4 and stored as GPTQ (``qweight`` [in/8, out], packed along the
    input) or AutoAWQ GEMM (``qweight`` [in, out/8], packed along the output) do, with ``qzeros`` [in/group, out/8],
    ``scales`` [in/group, out] and, for GPTQ, ``g_idx`` [in]."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(twin / "model.safetensors"))
    for name in [n for n in tensors if n.startswith("model.layers.") and n.split(".")[-2] in LINEARS]:
        base = name.removesuffix(".weight")
        codes, scale, zero = int4_groups(tensors.pop(name), group)
        tensors[base + ".qweight"] = pack_int4(codes.T.contiguous(), 0 if method == "gptq" else 1)
        tensors[base + ".qzeros"] = pack_int4(zero.T.contiguous(), 1)
        tensors[base + ".scales"] = scale.T.contiguous().to(torch.float16)
        if method == "gptq":
            tensors[base + ".g_idx"] = (torch.arange(codes.shape[1]) // group).to(torch.int32)
    out.mkdir()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((twin / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": method, **qconfig}}))
    return out


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_int4_packed_qweight_counts_its_unquantized_twins_parameters(
    tiny_llama: Path, tmp_path: Path, method: str
) -> None:
    folder = int4_checkpoint(tiny_llama, tmp_path / method, method, {"bits": 4, "group_size": 16})
    with safe_open(folder / "model.safetensors", "pt") as f:
        assert f.get_slice("model.layers.0.mlp.down_proj.qweight").get_dtype() == "I32"
    assert_same_cost(folder, tiny_llama)
    unknown = int4_checkpoint(tiny_llama, tmp_path / f"{method}-no-bits", method, {"group_size": 16})
    with pytest.raises(ModelError, match=r"cannot tell how many weights the packed tensor .*qweight"):
        cost_of(unknown)
