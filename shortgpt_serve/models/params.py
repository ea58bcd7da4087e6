"""Parameters as the cost model counts them: logical (unpacked) counts of quantized tensors, active MoE experts.

A checkpoint's parameters are what it stores, on disk and in memory: every expert of an MoE layer. A generated
token's matmul FLOPs use the *active* ones: a sparse layer sends each token to ``num_experts_per_tok`` of its
routed experts, while its router and shared experts always run.

Quantized checkpoints store packed integers (GPTQ/AWQ ``qweight``: int32 words of 32/bits values; compressed-tensors
``weight_packed``; bitsandbytes 4-bit ``weight``: bytes of two values) beside scales and zero points. A parameter
is one logical weight, so a packed tensor counts its unpacked elements and the quantization's own tensors (scales,
zero points, group indices, stored shapes) count nothing: a quantized checkpoint has its unquantized twin's
parameter count.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from math import prod
from pathlib import Path
from typing import Any

from shortgpt_serve.errors import ModelError
from shortgpt_serve.models.weights import layer_of, layer_pattern, tensor_infos, weight_map

# The quantization's own tensors (compressed-tensors, GPTQ/AWQ, FP8 block scales, bitsandbytes): not parameters.
AUXILIARY = re.compile(
    r"\.(weight_scale|weight_scale_inv|weight_zero_point|weight_g_idx|weight_shape|weight_global_scale"
    r"|input_scale|input_zero_point|input_global_scale|output_scale|output_zero_point|[qkv]_scale"
    r"|qzeros|scales|g_idx|SCB|weight_format)$"
    r"|\.weight\.(absmax|quant_map|nested_absmax|nested_quant_map|quant_state\..+)$"
)
PACKED = re.compile(r"(^|\.)(qweight|weight_packed)$")
STORAGE_BITS = {"I64": 64, "U64": 64, "I32": 32, "U32": 32, "I16": 16, "U16": 16, "I8": 8, "U8": 8}
# An MoE layer's routed experts: ``experts.<N>.<...>`` one per expert, or fused ``experts.gate_up_proj`` whose
# first dimension is the expert. Shared experts (``shared_expert``, ``shared_experts``) and the router are not.
EXPERT = re.compile(r"(?:^|\.)experts\.(?:(\d+)\.)?")


def quantization_config(config: Mapping[str, Any]) -> dict[str, Any] | None:
    for where in (config, config.get("text_config") or {}):
        for key in ("quantization_config", "compression_config"):
            value = where.get(key)
            if isinstance(value, dict):
                return value
    return None


def weight_bits(qconfig: Mapping[str, Any]) -> int | None:
    """Bits per quantized weight, where the config says one number for all of them."""
    if qconfig.get("quant_method") == "bitsandbytes":
        return 4 if qconfig.get("load_in_4bit") else 8
    for key in ("bits", "w_bit", "num_bits"):
        if isinstance(qconfig.get(key), int):
            return int(qconfig[key])
    groups = qconfig.get("config_groups")
    if isinstance(groups, dict):
        found = {
            g["weights"].get("num_bits")
            for g in groups.values()
            if isinstance(g, dict) and isinstance(g.get("weights"), dict)
        }
        if len(found) == 1 and isinstance(next(iter(found)), int):
            return int(next(iter(found)))
    return None


def param_counts(folder: Path, config: Mapping[str, Any]) -> dict[str, int]:
    """Logical parameters in each parameter tensor of the checkpoint in ``folder`` (quantization tensors left out)."""
    infos = tensor_infos(folder)
    qconfig = quantization_config(config)
    if qconfig is None:
        return {name: prod(shape) for name, (_, shape) in infos.items()}
    bits = weight_bits(qconfig)
    stored_shapes = _stored_shapes(folder, [n for n in infos if n.endswith(".weight_shape")])
    bnb_4bit = {
        m.group(1) for n in infos if (m := re.match(r"^(.+\.weight)\.(absmax|quant_state\..+)$", n)) is not None
    }
    counts: dict[str, int] = {}
    for name, (dtype, shape) in infos.items():
        if AUXILIARY.search(name):
            continue
        if PACKED.search(name) or name in bnb_4bit:
            shape_name = name.removesuffix("_packed") + "_shape"
            if shape_name in stored_shapes:  # compressed-tensors keeps the unpacked shape beside the packed tensor
                counts[name] = prod(stored_shapes[shape_name])
                continue
            storage = STORAGE_BITS.get(dtype)
            if bits is None or storage is None or (prod(shape) * storage) % bits:
                raise ModelError(
                    f"{folder}: cannot tell how many weights the packed tensor {name} ({dtype} {list(shape)}) holds "
                    f"(quantization_config gives {bits} bits per weight); the cost model needs the unpacked count."
                )
            counts[name] = prod(shape) * storage // bits
        else:
            counts[name] = prod(shape)
    return counts


def _stored_shapes(folder: Path, names: list[str]) -> dict[str, tuple[int, ...]]:
    """The values of compressed-tensors' ``weight_shape`` tensors (a few integers each)."""
    if not names:
        return {}
    from safetensors import safe_open

    mapping = weight_map(folder)
    out: dict[str, tuple[int, ...]] = {}
    for name in names:
        with safe_open(folder / mapping[name], framework="pt") as f:
            out[name] = tuple(int(v) for v in f.get_tensor(name).flatten().tolist())
    return out


def moe_routing(config: Mapping[str, Any]) -> tuple[int, int] | None:
    """(routed experts per token, routed experts per sparse layer), or None for a dense model.

    Keys as the supported MoE families write them: Qwen2/Qwen3-MoE ``num_experts`` (transformers 5 also writes
    Qwen3-MoE's as ``num_local_experts``), Mixtral ``num_local_experts``, DeepSeek-style ``n_routed_experts``.
    """
    text = config.get("text_config") or config
    experts = next(
        (int(text[k]) for k in ("num_experts", "num_local_experts", "n_routed_experts") if text.get(k)), None
    )
    if not experts:
        return None
    per_token = text.get("num_experts_per_tok")
    if not isinstance(per_token, int) or not 0 < per_token <= experts:
        raise ModelError(
            f"config.json describes {experts} experts per MoE layer but no valid num_experts_per_tok "
            f"({per_token!r}); the cost model needs how many experts each token uses."
        )
    return per_token, experts


def active_params_by_layer(
    counts: Mapping[str, int], prefix: str, num_layers: int, config: Mapping[str, Any]
) -> list[int]:
    """Parameters each decoder layer uses per token: everything but its routed experts, plus ``num_experts_per_tok``
    of them (the experts of a layer are the same size, so that share of their total)."""
    pattern = layer_pattern(prefix)
    routing = moe_routing(config)
    dense = [0] * num_layers
    routed = [0] * num_layers
    expert_ids: list[set[int]] = [set() for _ in range(num_layers)]
    for name, count in counts.items():
        i = layer_of(name, pattern)
        if i is None or i >= num_layers:
            continue
        m = EXPERT.search(name)
        if m is None:
            dense[i] += count
            continue
        routed[i] += count
        if m.group(1) is not None:
            expert_ids[i].add(int(m.group(1)))
    if routing is None:
        if any(routed):
            raise ModelError(
                "the weights hold MoE experts but config.json gives no expert count (num_experts, "
                "num_local_experts or n_routed_experts); the config and the weights disagree."
            )
        return dense
    per_token, experts = routing
    for i, ids in enumerate(expert_ids):
        if ids and len(ids) != experts:
            raise ModelError(
                f"layer {i} stores {len(ids)} experts but config.json says {experts}; the config and the weights "
                "disagree."
            )
    return [d + r * per_token // experts for d, r in zip(dense, routed, strict=True)]
