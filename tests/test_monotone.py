from __future__ import annotations

import itertools
import random

import pytest

from shortgpt_serve.monotone import fit_retained, lower_bound, nonincreasing_fit, standard_error


def test_pools_adjacent_violators() -> None:
    fit = nonincreasing_fit([(1, 0.9, 1.0), (2, 0.7, 1.0), (3, 0.8, 1.0), (4, 0.5, 1.0)])
    assert fit == pytest.approx({1: 0.9, 2: 0.75, 3: 0.75, 4: 0.5})
    weighted = nonincreasing_fit([(2, 0.7, 3.0), (3, 0.8, 1.0)])
    assert weighted == pytest.approx({2: 0.725, 3: 0.725})  # the surer point moves less


def test_fit_is_nonincreasing_and_the_least_squares_one() -> None:
    rng = random.Random(0)
    for _ in range(200):
        points = [(n, rng.random(), rng.uniform(0.5, 2.0)) for n in rng.sample(range(30), rng.randint(1, 8))]
        fit = nonincreasing_fit(points)
        values = [fit[n] for n, _, _ in sorted(points)]
        assert all(a >= b - 1e-12 for a, b in itertools.pairwise(values))
        sse = sum(w * (fit[n] - y) ** 2 for n, y, w in points)
        # No non-increasing fit does better: compare with small monotone perturbations of it.
        for _ in range(20):
            shift = rng.uniform(-0.05, 0.05)
            k = rng.randrange(len(values))
            other = sorted(values[:k] + [v + shift for v in values[k:]], reverse=True)
            ordered = sorted(points)
            assert sse <= sum(w * (o - y) ** 2 for (n, y, w), o in zip(ordered, other, strict=True)) + 1e-12
    already = [(1, 0.9, 1.0), (4, 0.8, 2.0), (9, 0.1, 1.0)]
    assert nonincreasing_fit(already) == {1: 0.9, 4: 0.8, 9: 0.1}


def test_noise_from_the_interval_or_the_standard_error() -> None:
    assert standard_error({"retained": 0.8, "retained_ci": [0.7, 0.9]}) == pytest.approx(0.2 / 3.919928)
    assert standard_error({"retained": 0.8, "retained_se": 0.05}) == 0.05
    assert standard_error({"retained": 0.8}) is None
    assert standard_error({"retained": 1.0, "retained_ci": [1.0, 1.0]}) == 1e-3  # never an infinite weight
    assert lower_bound({"retained": 0.8, "retained_ci": [0.7, 0.9]}) == 0.7
    assert lower_bound({"retained": 0.8, "retained_se": 0.05}) == pytest.approx(0.8 - 1.959964 * 0.05)
    assert lower_bound({"retained": 0.8}) == 0.8


def test_fit_weighs_points_by_their_intervals() -> None:
    fit = fit_retained(
        {3: {"retained": 0.80, "retained_ci": [0.79, 0.81]}, 4: {"retained": 0.90, "retained_ci": [0.70, 1.0]}}
    )
    assert fit[3] == fit[4] and 0.80 < fit[3] < 0.81  # the narrow interval dominates
    unknown = fit_retained({3: {"retained": 0.80, "retained_ci": [0.70, 0.90]}, 4: {"retained": 0.90}})
    assert unknown[3] == pytest.approx(0.85)  # no noise known: weighed like the noisiest point
