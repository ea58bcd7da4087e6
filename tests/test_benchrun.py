"""A benchmark run's typed record: its JSON (what the cache holds) and the full-vs-shortened ratios."""

from __future__ import annotations

from typing import Any

import pytest

from shortgpt_serve.serving.benchrun import BenchmarkRun, ratios


def run_json(tps: float, e2e: float, name: str = "m", level: str = "1") -> dict[str, Any]:
    return {
        "model_name": name,
        "measured_at": 1.7e9,
        "levels": {
            level: {
                "requests": 8,
                "failed": 0,
                "errors": [],
                "duration_s": 12.8,
                "output_tokens": 512,
                "output_tokens_per_s": tps,
                "requests_per_s": tps / 64,
                "ttft_s": {"0.5": 0.05, "0.9": 0.06, "0.99": 0.07},
                "tpot_s": {"0.5": 0.02},
                "itl_s": {"0.5": 0.02},
                "e2e_s": {"0.5": e2e, "0.9": e2e, "0.99": e2e},
                "concurrency": int(level),
            }
        },
        "how": "sequential",
    }


def run(tps: float, e2e: float, name: str = "m", level: str = "1") -> BenchmarkRun:
    return BenchmarkRun.from_json(run_json(tps, e2e, name, level))


def test_json_round_trip_keeps_every_key() -> None:
    data = run_json(40.0, 2.0)
    back = BenchmarkRun.from_json(data)
    assert back.levels["1"].e2e_s["0.99"] == 2.0 and back.levels["1"].concurrency == 1
    assert back.to_json() == data
    assert list(back.to_json()["levels"]["1"]) == list(data["levels"]["1"])  # same key order as before


def test_malformed_runs_are_refused() -> None:
    with pytest.raises(KeyError):
        BenchmarkRun.from_json({"model_name": "m", "measured_at": 1.0})
    with pytest.raises(TypeError):
        BenchmarkRun.from_json({"model_name": "m", "measured_at": 1.0, "levels": [1]})
    with pytest.raises(TypeError):  # a level without its measurements
        BenchmarkRun.from_json({"model_name": "m", "measured_at": 1.0, "levels": {"1": {"failed": 0}}})


def test_ratios_against_the_flop_ideal() -> None:
    full, short = run(40.0, 2.0), run(50.0, 1.6)
    r = ratios(full, short, predicted_cost=0.8)["1"]
    assert r["speedup"] == pytest.approx(1.25)
    assert r["measured_cost"] == pytest.approx(0.8)
    assert r["latency_saving"] == pytest.approx(0.2)
    assert r["ideal_speedup"] == pytest.approx(1.25)
    assert r["efficiency"] == pytest.approx(1.0)
    assert "efficiency" not in ratios(full, short, predicted_cost=None)["1"]
    assert ratios(full, run(50.0, 1.6, level="16"), 0.8) == {}  # no level in common
