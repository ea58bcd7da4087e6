"""The context length a model's rotary position embedding (RoPE) base supports (Men et al., 2024, "Base of RoPE
Bounds Context Length").

With RoPE, a query and a key m positions apart meet through the rotation angles m·θ_i of the head's frequency
pairs. The paper shows that a model can attend more to a similar token than to a random one at distance m only
while B(m) = Σ_i cos(m·θ_i) ≥ 0. The first m where B(m) < 0 therefore bounds the context the model can really use,
whatever length it was trained at or is served at. Beyond the bound, perplexity stays low but retrieval becomes
superficial. With θ_i = base^(-2i/d), base 10,000 and head dimension 128 give about 1.7k tokens. The paper fits
the bound as base ≥ 0.0424·L^1.628.

The frequencies are the model's own: the config's ``rope_parameters`` (``rope_theta`` and any scaling) as
transformers computes them. For linear, llama3, YaRN, LongRoPE and the other rope types, transformers' own
functions compute them, so the bound follows the scaling. Dynamic NTK scaling raises the base with the sequence
length, so its bound is computed at the length asked about. With a partial rotary factor, only the rotated pairs
enter B(m); the other dimensions carry no position.

Layer removal leaves the position embedding as it is: the full and the shortened model have the same bound.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

log = logging.getLogger(__name__)

BLOCK = 1 << 15
"""Positions evaluated at once (BLOCK x frequency pairs cosines)."""
MIN_SEARCH = 1 << 16
"""Positions searched at least, and at least 4 x the length asked about: a bound further out than that is
reported as "beyond" (about a second per million positions at 64 frequency pairs)."""
PAPER_FIT = (0.0424, 1.628)
"""The paper's fit of the least base for a context length L: base >= 0.0424 * L ** 1.628."""


@dataclass(frozen=True)
class RopeBound:
    """Where B(m) first turns negative for one model's rotary frequencies."""

    rope_type: str
    base: float
    rotary_dims: int
    """Dimensions per head that RoPE rotates (twice the frequency pairs)."""
    bound: int | None
    """The largest m with B(m') >= 0 for every m' <= m; None when B stays non-negative up to ``searched``."""
    searched: int

    def covers(self, length: int) -> bool:
        """Whether every distance within ``length`` tokens is inside the bound."""
        return length - 1 <= (self.bound if self.bound is not None else self.searched)

    def describe(self) -> str:
        what = f"RoPE base {self.base:,.0f} ({self.rope_type}, {self.rotary_dims} rotary dimensions per head)"
        if self.bound is None:
            return f"{what}: B(m) >= 0 for every distance up to {self.searched:,} tokens (Men et al. 2024)"
        return f"{what} bounds the context the model can really use at ~{self.bound:,} tokens (Men et al. 2024)"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def first_negative(inv_freq: Sequence[float], limit: int) -> int | None:
    """The first distance m in 1..``limit`` where Σ_i cos(m·inv_freq_i) < 0, in float64; None when there is none."""
    import numpy as np

    freq = np.asarray(inv_freq, dtype=np.float64)
    for start in range(1, limit + 1, BLOCK):
        m = np.arange(start, min(limit, start + BLOCK - 1) + 1, dtype=np.float64)
        negative = np.flatnonzero(np.cos(np.outer(m, freq)).sum(axis=1) < 0)
        if negative.size:
            return int(m[negative[0]])
    return None


def model_context(config: Mapping[str, Any]) -> int | None:
    """The model's own maximum context (``max_position_embeddings`` of its text config); None when not set."""
    nested = config.get("text_config")
    text: Mapping[str, Any] = nested if isinstance(nested, Mapping) else config
    trained = text.get("max_position_embeddings")
    return trained if isinstance(trained, int) and trained > 0 else None


def context_record(config: Mapping[str, Any]) -> dict[str, Any]:
    """The RoPE bound at the model's own maximum context, for the report."""
    trained = model_context(config)
    rope = rope_bound(config, trained)
    return {
        "max_position_embeddings": trained,
        "rope": None if rope is None else rope.to_dict(),
        "within_bound": None if rope is None or trained is None else rope.covers(trained),
        "summary": describe_context(rope, trained),
    }


def describe_context(rope: RopeBound | None, trained: int | None) -> str:
    """One sentence: the bound against the model's own maximum context."""
    if rope is None:
        return "The model has no rotary position embedding whose base could bound its context."
    text = rope.describe()
    if trained is None:
        return text + "."
    if rope.covers(trained):
        return f"{text}; within it, the model's own maximum of {trained:,} tokens."
    return f"{text}, short of the model's own maximum of {trained:,} tokens."


def rope_bound(config: Mapping[str, Any], length: int | None = None) -> RopeBound | None:
    """The bound for a model's ``config.json`` contents; ``length``: the context asked about (the search reaches
    at least 4 x it; dynamic NTK scaling is evaluated at it). None when the model has no rotary embedding or
    transformers cannot build its config (the reason is logged)."""
    frequencies = rotary_frequencies(config, length)
    if frequencies is None:
        return None
    rope_type, base, inv_freq = frequencies
    limit = max(MIN_SEARCH, 4 * (length or 0))
    negative = first_negative(inv_freq, limit)
    return RopeBound(rope_type, base, 2 * len(inv_freq), None if negative is None else negative - 1, limit)


def rotary_frequencies(config: Mapping[str, Any], length: int | None = None) -> tuple[str, float, list[float]] | None:
    """(rope type, base, the inverse frequencies per rotated pair) as transformers computes them for the model."""
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    settings = {k: v for k, v in config.items() if k != "model_type"}
    try:
        built = AutoConfig.for_model(str(config.get("model_type")), **settings)
    except (ValueError, KeyError, TypeError) as exc:
        log.info("RoPE bound not computed: transformers cannot build this config (%s)", exc)
        return None
    text = built.get_text_config()
    params = getattr(text, "rope_parameters", None)
    if not isinstance(params, Mapping):
        return None  # no rotary embedding (learned positions, ALiBi)
    layer_type = None
    if "rope_theta" not in params:
        # Per layer type (e.g. sliding and full attention with their own bases): full attention sees the whole
        # context, so it is the one that bounds it.
        layer_type, params = "full_attention", params.get("full_attention")
        if not isinstance(params, Mapping) or "rope_theta" not in params:
            return None
    rope_type = str(params.get("rope_type") or "default")
    base = float(params["rope_theta"])
    compute = ROPE_INIT_FUNCTIONS.get(rope_type)
    if rope_type != "default" and compute is None:
        log.info("RoPE bound not computed: rope type %r is not one transformers knows", rope_type)
        return None
    try:
        if rope_type == "default":
            head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
            dim = int(head_dim * float(params.get("partial_rotary_factor") or 1.0))
            return rope_type, base, [base ** (-i / dim) for i in range(0, dim, 2)]
        assert compute is not None
        inv_freq, _ = compute(text, "cpu", seq_len=length, layer_type=layer_type)
    except (AttributeError, KeyError, TypeError, ValueError, ZeroDivisionError) as exc:  # a config it cannot read
        log.info("RoPE bound not computed: the %s rope parameters cannot be read (%s)", rope_type, exc)
        return None
    return rope_type, base, [float(f) for f in inv_freq.tolist()]


def paper_least_base(length: int) -> float:
    """The least base the paper's fit gives for a context of ``length`` tokens."""
    a, k = PAPER_FIT
    return a * length**k
