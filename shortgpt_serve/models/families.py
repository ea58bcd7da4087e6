"""Model families we know how to shorten, and what each stores per layer.

A family is supported only when we know where its decoder layers live (in the module tree and in the weight
names) and which config entries describe individual layers, so they can be cut with the layers. Anything else
is refused with a clear error rather than written as a silently broken checkpoint.

Per-layer config comes in three shapes, all handled here:
- lists with one entry per layer (``layer_types``, ``no_rope_layers``): cut like the layers;
- lists of layer indices (``mlp_only_layers``, ``moe_layers``): renumbered, removed layers dropped;
- rules over the layer index (``decoder_sparse_step``, ``sliding_window_pattern``, ``max_window_layers``): the
  rule would pick different layers after renumbering, so the kept layers' pattern is written out explicitly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from shortgpt_serve.errors import ModelError


@dataclass(frozen=True)
class Family:
    model_type: str
    layers_module: str = "model.layers"
    """Dotted path of the decoder layers' ModuleList, also the weight-name prefix (``model.layers.<i>.``)."""
    moe_step: bool = False
    """Qwen-style MoE: layer i is sparse iff i not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0."""
    implicit_layer_types: bool = False
    """The config may leave ``layer_types`` to a rule (Gemma's sliding_window_pattern, Qwen's max_window_layers)."""


FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        Family("llama"),
        Family("mistral"),
        Family("mixtral"),
        Family("qwen2", implicit_layer_types=True),
        Family("qwen3", implicit_layer_types=True),
        Family("qwen2_moe", moe_step=True),
        Family("qwen3_moe", moe_step=True),
        Family("gemma2", implicit_layer_types=True),
        Family("gemma3_text", implicit_layer_types=True),
        Family("phi3"),
        Family("olmo2"),
        Family("granite"),
    )
}

PER_LAYER_LISTS = ("layer_types", "no_rope_layers")
"""Config lists with one entry per decoder layer."""
LAYER_INDEX_LISTS = ("mlp_only_layers", "moe_layers")
"""Config lists of decoder-layer indices."""


def supported_types() -> str:
    return ", ".join(sorted(FAMILIES))


def family_for(config: dict[str, Any], where: str) -> Family:
    """The family of a model from its ``config.json`` contents; refuses what we cannot shorten."""
    archs = config.get("architectures") or []
    model_type = config.get("model_type")
    if not archs or not any(str(a).endswith("ForCausalLM") for a in archs):
        raise ModelError(
            f"{where} is not a causal language model (architectures: {archs or 'none'}); "
            "give a decoder-only *ForCausalLM checkpoint."
        )
    if model_type not in FAMILIES:
        raise ModelError(
            f"{where}: architecture {archs[0]} (model_type {model_type!r}) is not supported; "
            f"supported model types: {supported_types()}."
        )
    if not isinstance(config.get("num_hidden_layers"), int):
        raise ModelError(f"{where}: config.json has no integer num_hidden_layers; the checkpoint is incomplete.")
    return FAMILIES[model_type]


def derived_layer_types(config: dict[str, Any]) -> list[str] | None:
    """``layer_types`` as the installed transformers derives it when the config leaves it implicit
    (Gemma's ``sliding_window_pattern``, Qwen2's ``max_window_layers``, ...), or None if the family has none."""
    if isinstance(config.get("layer_types"), list):
        return list(config["layer_types"])
    try:
        from transformers import AutoConfig

        fields = {k: v for k, v in config.items() if k not in ("model_type", "transformers_version")}
        derived = AutoConfig.for_model(config["model_type"], **fields)
    except (ValueError, KeyError, TypeError):
        return None
    value = getattr(derived, "layer_types", None)
    return list(value) if isinstance(value, list) and len(value) == config["num_hidden_layers"] else None


def sparse_layers(config: dict[str, Any]) -> list[bool]:
    """Which layers have a sparse MoE block under the Qwen MoE rule (shared by transformers and vLLM)."""
    n = config["num_hidden_layers"]
    step = int(config.get("decoder_sparse_step") or 1)
    dense = set(config.get("mlp_only_layers") or [])
    # transformers 5 stores Qwen3-MoE's expert count as num_local_experts (num_experts is its alias).
    experts = int(config.get("num_experts") or config.get("num_local_experts") or 0)
    return [i not in dense and experts > 0 and (i + 1) % step == 0 for i in range(n)]


def shortened_config(config: dict[str, Any], removed: list[int]) -> dict[str, Any]:
    """A copy of ``config`` describing the model without the ``removed`` layers (original indices)."""
    n = config["num_hidden_layers"]
    gone = set(removed)
    keep = [i for i in range(n) if i not in gone]
    new_index = {old: new for new, old in enumerate(keep)}
    family = FAMILIES[config["model_type"]]
    out = dict(config)
    out["num_hidden_layers"] = len(keep)
    layer_types = derived_layer_types(config) if family.implicit_layer_types else config.get("layer_types")
    if isinstance(layer_types, list) and len(layer_types) == n:
        out["layer_types"] = [layer_types[i] for i in keep]
    for key in PER_LAYER_LISTS:
        value = out.get(key)
        if key != "layer_types" and isinstance(value, list) and len(value) == n:
            out[key] = [value[i] for i in keep]
    if family.moe_step:
        sparse = sparse_layers(config)
        out["decoder_sparse_step"] = 1
        out["mlp_only_layers"] = [new_index[i] for i in keep if not sparse[i]]
    for key in LAYER_INDEX_LISTS:
        value = out.get(key)
        if not (family.moe_step and key == "mlp_only_layers") and isinstance(value, list):
            out[key] = [new_index[i] for i in value if isinstance(i, int) and i in new_index]
    # Qwen2-style: sliding window applies to layers >= max_window_layers; keep the same layers windowed.
    mwl = out.get("max_window_layers")
    if isinstance(mwl, int) and 0 <= mwl <= n:
        out["max_window_layers"] = sum(1 for i in keep if i < mwl)
    if isinstance(out.get("quantization_config"), dict):
        out["quantization_config"] = shortened_quantization_config(
            out["quantization_config"], family.layers_module, new_index, n
        )
    return out


def renumber_module(name: str, prefix: str, new_index: dict[int, int]) -> str | None:
    """``<prefix>.<i>[.rest]`` with i renumbered; None if layer i was removed; other names unchanged."""
    m = re.match(rf"^{re.escape(prefix)}\.(\d+)(\..*)?$", name)
    if m is None:
        return name
    i = int(m.group(1))
    return None if i not in new_index else f"{prefix}.{new_index[i]}{m.group(2) or ''}"


def shortened_quantization_config(
    qconfig: dict[str, Any], prefix: str, new_index: dict[int, int], num_layers: int
) -> dict[str, Any]:
    """Renumber the module names a quantization config lists (compressed-tensors ``ignore``, AWQ/bitsandbytes
    ``modules_to_not_convert``, ...). Regex entries that single out layers by number cannot be renumbered safely
    and are refused."""
    out = dict(qconfig)
    for key in ("ignore", "modules_to_not_convert", "skip_modules", "modules_in_block_to_quantize"):
        value = out.get(key)
        if not isinstance(value, list):
            continue
        kept = []
        for entry in value:
            if not isinstance(entry, str):
                kept.append(entry)
                continue
            if entry.startswith("re:") and re.search(r"layers[^a-zA-Z]*\d", entry):
                raise ModelError(
                    f"quantization_config.{key} has a regex naming layers by number ({entry!r}); it cannot be "
                    "renumbered safely. Replace it with explicit module names and retry."
                )
            new = renumber_module(entry, prefix, new_index)
            if new is not None:
                kept.append(new)
        out[key] = kept
    dynamic = out.get("dynamic")
    if isinstance(dynamic, dict) and any(re.search(r"layers[^a-zA-Z]*\d", str(k)) for k in dynamic):
        raise ModelError(
            "quantization_config.dynamic names layers by number; it cannot be renumbered safely. "
            "Requantize after shortening instead."
        )
    return out
