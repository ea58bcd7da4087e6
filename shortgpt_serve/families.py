"""Model families we know how to shorten, and what each stores per layer.

A family is supported only when we know where its decoder layers live (in the module tree and in the weight
names) and which config entries are per-layer lists that must be cut with the layers. Anything else is refused
with a clear error rather than written as a silently broken checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from shortgpt_serve.errors import ModelError


@dataclass(frozen=True)
class Family:
    model_type: str
    layers_module: str = "model.layers"
    """Dotted path of the decoder layers' ModuleList, also the weight-name prefix (``model.layers.<i>.``)."""
    per_layer_keys: tuple[str, ...] = ()
    """Config entries holding one value per decoder layer."""


# Config lists indexed by layer that any family may carry; cut whenever present with the right length.
COMMON_PER_LAYER_KEYS = ("layer_types", "no_rope_layers")

FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        Family("llama"),
        Family("mistral"),
        Family("qwen2"),
        Family("qwen3"),
    )
}


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


def shortened_config(config: dict[str, Any], removed: list[int]) -> dict[str, Any]:
    """A copy of ``config`` with the removed layers' entries cut from every per-layer setting."""
    n = config["num_hidden_layers"]
    keep = [i for i in range(n) if i not in set(removed)]
    family = FAMILIES[config["model_type"]]
    out = dict(config)
    out["num_hidden_layers"] = len(keep)
    for key in (*COMMON_PER_LAYER_KEYS, *family.per_layer_keys):
        value = out.get(key)
        if isinstance(value, list) and len(value) == n:
            out[key] = [value[i] for i in keep]
    # Qwen2-style: sliding window applies to layers >= max_window_layers; keep the same layers windowed.
    mwl = out.get("max_window_layers")
    if isinstance(mwl, int) and 0 <= mwl <= n:
        out["max_window_layers"] = sum(1 for i in keep if i < mwl)
    return out
