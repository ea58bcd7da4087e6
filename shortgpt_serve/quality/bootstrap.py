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

from shortgpt_serve.errors import QualityError
from shortgpt_serve.quality.retained import SIGNAL_SE

LEVEL = 0.95


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
    import numpy as np

    if resamples <= 0:
        return None
    if set(full) != set(short) or set(full) != set(chances):
        raise QualityError("the bootstrap needs per-item outcomes of both models and chances on the same tasks.")
    rng = np.random.default_rng(seed)
    total = np.zeros(resamples)
    counted = np.zeros(resamples)
    for task in sorted(full):
        f = np.asarray(full[task], dtype=float)
        s = np.asarray(short[task], dtype=float)
        c = np.asarray(chances[task], dtype=float)
        n = len(f)
        if len(s) != n or len(c) != n:
            raise QualityError(f"{task}: the bootstrap needs the same items for both models.")
        if n == 0:
            continue
        draws = rng.integers(0, n, size=(resamples, n))
        f_score, s_score, c_score = f[draws].mean(1), s[draws].mean(1), c[draws].mean(1)
        margin = f_score - c_score
        signal = margin > SIGNAL_SE * np.sqrt(c_score * (1.0 - c_score) / n)
        share = np.clip((s_score - c_score) / np.where(signal, margin, 1.0), 0.0, 1.0)
        total += np.where(signal, share, 0.0)
        counted += signal
    ok = counted > 0
    if ok.sum() * 2 < resamples:
        return None
    values = total[ok] / counted[ok]
    low, high = np.quantile(values, [(1.0 - level) / 2, (1.0 + level) / 2])
    return float(low), float(high)


def interval_or_none(value: tuple[float, float] | None) -> list[float] | None:
    """The interval as JSON writes it ([low, high]), None when there is none or it is not finite."""
    if value is None or not all(math.isfinite(v) for v in value):
        return None
    return [value[0], value[1]]
