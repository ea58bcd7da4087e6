"""The context length vLLM is asked to serve, against the one the model's RoPE base supports (models/rope.py).

The served length is vLLM's ``--max-model-len`` when it is among the arguments after ``--``, else the model's own
maximum (``max_position_embeddings``, which vLLM serves by default). When it is longer than the RoPE bound, the
launcher says so in one warning line before the engine starts; both figures are exported as metrics.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from shortgpt_serve.models.rope import RopeBound, model_context, paper_least_base, rope_bound

MAX_MODEL_LEN = "--max-model-len"
_SUFFIX = {"k": 10**3, "m": 10**6, "g": 10**9, "K": 2**10, "M": 2**20, "G": 2**30}


def parse_length(text: str) -> int | None:
    """A length as vLLM reads ``--max-model-len`` ('4096', '32k' = 32,000, '32K' = 32,768); None for 'auto' or -1
    (vLLM picks what fits) or anything it would refuse."""
    text = text.strip()
    if text.isdigit():
        return int(text)
    found = re.fullmatch(r"(\d+(?:\.\d+)?)([kmgKMG])", text)
    if found is None or (found[2].isupper() and "." in found[1]):
        return None
    return int(float(found[1]) * _SUFFIX[found[2]])


def max_model_len(vllm_args: Sequence[str]) -> str | None:
    """The value of ``--max-model-len`` (or ``--max_model_len``) among vLLM's arguments; the last one wins."""
    value = None
    for i, arg in enumerate(vllm_args):
        flag, eq, rest = arg.partition("=")
        if flag.replace("_", "-") == MAX_MODEL_LEN:
            value = rest if eq else (vllm_args[i + 1] if i + 1 < len(vllm_args) else None)
    return value


@dataclass(frozen=True)
class ServedContext:
    length: int | None
    """Tokens per sequence vLLM serves; None when neither the arguments nor the config say."""
    source: str
    """Where ``length`` comes from."""
    rope: RopeBound | None

    def warning(self) -> str | None:
        """One line when the served length reaches past the RoPE bound; None otherwise."""
        rope = self.rope
        if rope is None or rope.bound is None or self.length is None or rope.covers(self.length):
            return None
        return (
            f"The context served, {self.length:,} tokens ({self.source}), reaches past the ~{rope.bound:,} its RoPE "
            f"base {rope.base:,.0f} supports (Men et al. 2024): beyond that distance perplexity stays low but "
            f"retrieval is superficial (the paper's fit wants base >= {paper_least_base(self.length):,.0f} for "
            f"{self.length:,}). To serve within it: -- {MAX_MODEL_LEN} {rope.bound + 1}."
        )


def served_context(config: Mapping[str, Any], vllm_args: Sequence[str]) -> ServedContext:
    """The served length and the RoPE bound at it, for a checkpoint's ``config.json`` contents."""
    given = max_model_len(vllm_args)
    length = parse_length(given) if given is not None else None
    source = MAX_MODEL_LEN
    if length is None:
        length, source = model_context(config), "the model's max_position_embeddings"
    return ServedContext(length, source, rope_bound(config, length))
