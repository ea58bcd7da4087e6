"""How the profile's model work holds the weights: whole when they fit the memory setting, else streamed.

Decided from the checkpoint's headers before anything is loaded, so a model that cannot fit even streamed is
refused with one line before any long work. Sizes are in the dtype the work computes in.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from shortgpt_serve.errors import ConfigError, ModelError

UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
RESERVE = 512 * 2**20
"""Held back from the setting for what is not weights or states: the runtime, activations inside a layer, logits."""
AUTO_SHARE = 0.9
"""Of the device's free memory, the share ``auto`` lets the work hold."""


def parse_size(text: str, flag: str = "--memory") -> int:
    """``16GiB``, ``800MB``, ``1.5 GB``, ``4096`` (bytes) -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    unit = m.group(2).lower() if m else ""
    if m is None or unit not in UNITS or float(m.group(1)) <= 0:
        raise ConfigError(
            f"{flag} must be auto, stream or a size such as 16GiB, 800MB or 1.5GB, got {text!r}.", param=flag
        )
    return int(float(m.group(1)) * UNITS[unit])


def format_size(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


@dataclass(frozen=True)
class Plan:
    mode: Literal["resident", "stream"]
    weights: int
    """Bytes of every weight, as computed."""
    largest: int
    """Bytes of the largest unit a streamed pass brings in at once (a decoder layer, or the embeddings/head)."""
    states: int
    """Bytes of the hidden states a pass holds (the calibration set's states at a boundary, and a layer's output)."""
    budget: int
    where: str
    """What set the budget, for messages ("--memory 8GiB", "free on cuda:0")."""
    ahead: int = 0
    """Streamed: bytes of the next layer read while the current one computes (the largest layer when the budget
    holds two; less when it holds one and a part, the rest read when that layer starts)."""

    def describe(self, name: str, num_layers: int) -> str:
        if self.mode == "resident":
            return (
                f"Memory plan for {name}: weights held whole ({format_size(self.weights)}; "
                f"{format_size(self.budget)} {self.where})"
            )
        held = (
            f"at most two layers of {format_size(self.largest)} held"
            if self.ahead >= self.largest
            else f"a layer of {format_size(self.largest)} and {format_size(self.ahead)} of the next held, the rest "
            "of each layer read when it starts"
        )
        return (
            f"Memory plan for {name}: streamed, {num_layers} layers read from disk on every pass "
            f"({format_size(self.weights)} of weights, {held}; {format_size(self.budget)} {self.where})"
        )


def plan(
    *,
    weights: int,
    largest: int,
    states: int,
    memory: str,
    free: int | None,
    device: str,
    name: str,
) -> Plan:
    """``memory``: auto (a share of ``free``), stream (streamed whatever fits) or a size.

    Resident when the weights, the states and a reserve fit; else streamed when one unit, the states and the
    reserve fit, the next layer read ahead (while the current one computes) as far as the rest of the budget
    allows, the whole of it when two units fit; else :class:`ModelError` naming what is needed and the setting to
    change.

    ``free``: the device's free memory (None: unknown, no limit).
    """
    if memory in ("auto", "stream"):
        budget, where = (int(free * AUTO_SHARE), f"free on {device}") if free is not None else (1 << 62, "")
    else:
        budget, where = parse_size(memory), f"by --memory {memory}"
        if free is not None and budget > free:
            budget, where = free, f"free on {device} (below --memory {memory})"
    if memory != "stream" and weights + 2 * states + RESERVE <= budget:
        return Plan("resident", weights, largest, states, budget, where)
    need = largest + 2 * states + RESERVE
    if need > budget:
        raise ModelError(
            f"{name}: even streamed layer by layer, profiling needs {format_size(need)} (a layer of "
            f"{format_size(largest)}, hidden states of {format_size(states)} and {format_size(RESERVE)} for the "
            f"runtime) but {format_size(budget)} is {where}; raise --memory, or lower --calibration-tokens."
        )
    return Plan("stream", weights, largest, states, budget, where, ahead=min(largest, budget - need))
