"""Quality against depth, read through its noise: a non-increasing fit of every depth measured.

Removing more layers cannot, in expectation, keep more quality, but one measured point can (about 100 items per
task give an interval of +-0.1 on quality retained). The search therefore decides on the weighted isotonic fit
(pool-adjacent-violators) of all the depths measured so far, each weighted by the inverse variance its 95%
interval implies: a point above a shallower one is pooled with it, so a single noisy measurement does not steer
the search alone, and a depth that is fine on its own but inconsistent with its neighbours is read with them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

Z95 = 1.959964
MIN_SE = 1e-3
"""Floor on a point's standard error, so a degenerate interval (an identical model) cannot outweigh the rest."""


def standard_error(q: Mapping[str, Any]) -> float | None:
    """The standard error of ``q["retained"]``: from its 95% interval (``retained_ci``), else ``retained_se``."""
    ci = q.get("retained_ci")
    if ci:
        return max((float(ci[1]) - float(ci[0])) / (2 * Z95), MIN_SE)
    se = q.get("retained_se")
    if se is not None and not math.isnan(float(se)):
        return max(float(se), MIN_SE)
    return None


def lower_bound(q: Mapping[str, Any]) -> float:
    """The lower end of the 95% interval of ``q["retained"]`` (the point itself when no noise is known)."""
    ci = q.get("retained_ci")
    if ci:
        return float(ci[0])
    se = standard_error(q)
    return float(q["retained"]) - (Z95 * se if se is not None else 0.0)


def nonincreasing_fit(points: Iterable[tuple[int, float, float]]) -> dict[int, float]:
    """Weighted least-squares fit of ``(depth, value, weight)`` points by a non-increasing function of depth.

    Pool-adjacent-violators: walk the depths in order, merging a block with the one before it while its mean is
    the higher; every depth gets its block's weighted mean. Exact, O(n).
    """
    blocks: list[list[Any]] = []  # [weighted sum, weight, depths]
    for n, value, weight in sorted(points):
        blocks.append([value * weight, weight, [n]])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] < blocks[-1][0] / blocks[-1][1]:
            total, w, depths = blocks.pop()
            blocks[-1][0] += total
            blocks[-1][1] += w
            blocks[-1][2] += depths
    return {n: total / w for total, w, depths in blocks for n in depths}


def fit_retained(measured: Mapping[int, Mapping[str, Any]]) -> dict[int, float]:
    """The non-increasing fit of quality retained over the measured depths (``{depth: quality record}``).

    Points without a known noise get the weight of the noisiest point that has one (or 1 when none has)."""
    ses = {n: standard_error(q) for n, q in measured.items()}
    worst = max((se for se in ses.values() if se is not None), default=1.0)
    return nonincreasing_fit(
        (n, float(q["retained"]), 1.0 / (se if (se := ses[n]) is not None else worst) ** 2) for n, q in measured.items()
    )
