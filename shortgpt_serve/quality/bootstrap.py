"""A paired bootstrap confidence interval for quality retained.

Both models answered the same items, so the interval resamples items, not models: each resample draws every
task's items with replacement, the same draws for the full and the shortened model, and recomputes retained from
the resampled scores exactly as :func:`~shortgpt_serve.quality.retained.quality_retained` does (each task's share
capped to [0, 1], tasks without signal in that resample left out). The percentile interval of those values is
what the item sample allows one to say about the retained share; pairing removes the item difficulty both models
share, so it is narrower than two independent intervals would suggest.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from shortgpt_serve.errors import QualityError
from shortgpt_serve.quality.retained import SIGNAL_SE

LEVEL = 0.95


def _check(*outcomes: Mapping[str, Sequence[Any]]) -> None:
    if any(set(o) != set(outcomes[0]) for o in outcomes):
        raise QualityError("the bootstrap needs per-item outcomes of both models and chances on the same tasks.")
    for task in outcomes[0]:
        if len({len(o[task]) for o in outcomes}) != 1:
            raise QualityError(f"{task}: the bootstrap needs the same items for both models.")


def _draws(chances: Mapping[str, Sequence[float]], resamples: int, seed: int) -> dict[str, Any]:
    """Per task, ``resamples`` draws of its item indices with replacement (seeded, in task order)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    n = {t: len(chances[t]) for t in sorted(chances)}
    return {t: rng.integers(0, n[t], size=(resamples, n[t])) for t in n if n[t]}


def _resampled(
    full: Mapping[str, Sequence[bool]],
    short: Mapping[str, Sequence[bool]],
    chances: Mapping[str, Sequence[float]],
    draws: Mapping[str, Any],
    resamples: int,
) -> tuple[Any, Any]:
    """Quality retained in each resample, and whether any task had signal in it."""
    import numpy as np

    total = np.zeros(resamples)
    counted = np.zeros(resamples)
    for task, idx in draws.items():
        n = idx.shape[1]
        f = np.asarray(full[task], dtype=float)[idx].mean(1)
        s = np.asarray(short[task], dtype=float)[idx].mean(1)
        c = np.asarray(chances[task], dtype=float)[idx].mean(1)
        margin = f - c
        signal = margin > SIGNAL_SE * np.sqrt(c * (1.0 - c) / n)
        share = np.clip((s - c) / np.where(signal, margin, 1.0), 0.0, 1.0)
        total += np.where(signal, share, 0.0)
        counted += signal
    ok = counted > 0
    return np.where(ok, total / np.maximum(counted, 1), np.nan), ok


def _percentiles(values: Any, ok: Any, resamples: int, level: float) -> tuple[float, float] | None:
    import numpy as np

    if ok.sum() * 2 < resamples:
        return None
    low, high = np.quantile(values[ok], [(1.0 - level) / 2, (1.0 + level) / 2])
    return float(low), float(high)


def retained_interval(
    full: Mapping[str, Sequence[bool]],
    short: Mapping[str, Sequence[bool]],
    chances: Mapping[str, Sequence[float]],
    resamples: int,
    seed: int,
    level: float = LEVEL,
) -> tuple[float, float] | None:
    """[low, high] of quality retained at ``level`` from ``resamples`` paired resamples (seeded), or None when
    ``resamples`` is 0 or most resamples have no task with signal.

    ``full``, ``short``: per task, whether each item is right on the task's primary metric (same items, same
    order); ``chances``: per task, each item's chance accuracy (1 / its number of choices).
    """
    if resamples <= 0:
        return None
    _check(full, short, chances)
    values, ok = _resampled(full, short, chances, _draws(chances, resamples, seed), resamples)
    return _percentiles(values, ok, resamples, level)


def gain_interval(
    full: Mapping[str, Sequence[bool]],
    base: Mapping[str, Sequence[bool]],
    other: Mapping[str, Sequence[bool]],
    chances: Mapping[str, Sequence[float]],
    resamples: int,
    seed: int,
    level: float = LEVEL,
) -> tuple[float, float] | None:
    """[low, high] of retained(other) - retained(base) at ``level``: all three models' items resampled together
    (the same draws), so the difference item difficulty makes in both is paired away. An interval that holds 0
    says the two are within noise of each other. None as :func:`retained_interval`."""
    if resamples <= 0:
        return None
    _check(full, base, other, chances)
    draws = _draws(chances, resamples, seed)
    a, ok_a = _resampled(full, base, chances, draws, resamples)
    b, ok_b = _resampled(full, other, chances, draws, resamples)
    return _percentiles(b - a, ok_a & ok_b, resamples, level)


def interval_or_none(value: tuple[float, float] | None) -> list[float] | None:
    """The interval as JSON writes it ([low, high]), None when there is none or it is not finite."""
    if value is None or not all(math.isfinite(v) for v in value):
        return None
    return [value[0], value[1]]
