"""Side-by-side benchmark of the full and the shortened model on the same engine and settings.

One fixed workload (``shortgpt_serve.serving.workload``) runs at each concurrency level on each model. The full model is
measured on its own engine, started with the same vLLM arguments and environment on a private loopback port and
stopped before the shortened model's engine starts: the two never run at once, so neither steals the other's
compute. Results are cached by what determines them: the model's content hash, the engine and its settings, the
machine, and the workload. The private engines' output goes to a log file in the cache (``logs/``), named in one
line, and its tail is shown when the engine fails, so the launcher's own account is not buried in engine output.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import platform
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shortgpt_serve import cache
from shortgpt_serve.config import BenchmarkConfig, ServeConfig
from shortgpt_serve.errors import CacheError, ServeError
from shortgpt_serve.provenance import Provenance
from shortgpt_serve.serving.benchrun import BenchmarkRun, ratios
from shortgpt_serve.serving.workload import Stopped, Workload, run_workload
from shortgpt_serve.tables import markdown_table
from shortgpt_serve.version import __version__

log = logging.getLogger(__name__)

HOW = "sequential: the full model's engine runs alone, then the shortened model's, with the same settings"
# Environment that changes how vLLM runs (threads, KV cache, devices), part of a result's cache key.
ENGINE_ENV_PREFIXES = ("VLLM_CPU_", "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS")
LOGS = "logs"
"""The cache's folder of the private benchmark engines' logs."""
KEEP_LOGS = 20
"""Benchmark engine logs kept in the cache; older ones are removed when a new one starts."""

# -- cache keys ----------------------------------------------------------------------------------------------------


def machine_description() -> str:
    """What the results depend on besides the model: the CPU model and count, or the GPUs."""
    with contextlib.suppress(Exception):
        import torch

        if torch.cuda.is_available():
            names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            return f"{len(names)} x {names[0]}"
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{os.cpu_count()} x {cpu}"


def engine_settings(dist: str, version: str, cfg: ServeConfig) -> dict[str, Any]:
    env = {k: v for k, v in sorted(os.environ.items()) if k.startswith(ENGINE_ENV_PREFIXES)}
    return {"engine": dist, "engine_version": version, "vllm_args": list(cfg.vllm_args), "env": env}


def result_key(model_sha256: str, settings: dict[str, Any], workload: Workload) -> dict[str, Any]:
    """What a result depends on; the cache keys the entry by its canonical sha256 and keeps it for `cache list`."""
    return {
        "tool": __version__,
        "model": model_sha256,
        "settings": settings,
        "machine": machine_description(),
        "workload": dataclasses.asdict(workload),
    }


class ResultCache:
    """Benchmark results as ``benchmarks`` entries of the cache: verified on read (a damaged one is removed and
    measured again), written whole under the entry's lock."""

    def __init__(self, cache_dir: Path) -> None:
        self.cache_dir = cache_dir

    def load(self, key: dict[str, Any]) -> BenchmarkRun | None:
        try:
            data = cache.load_json(self.cache_dir, "benchmarks", key)
        except CacheError as exc:
            log.warning("Benchmark results cannot be read from the cache: %s", exc.message)
            return None
        if data is None:
            return None
        try:
            return BenchmarkRun.from_json(data)
        except (KeyError, TypeError, ValueError, AttributeError):
            log.warning("Ignoring a malformed benchmark result in %s; measuring again", self.cache_dir / "benchmarks")
            return None

    def store(self, key: dict[str, Any], run: BenchmarkRun) -> None:
        describe = f"{run.model_name}: served benchmark at concurrency {', '.join(run.levels)}"
        try:
            cache.store_json(self.cache_dir, "benchmarks", key, run.to_json(), describe=describe)
        except CacheError as exc:
            log.warning("Could not cache the benchmark result (%s); it will be measured again", exc.message)


# -- comparison ----------------------------------------------------------------------------------------------------


TABLE_HEADER = ["concurrency", "model", "output tok/s", "req/s", "TTFT p50 ms", "TPOT p50 ms", "e2e p50 s", "e2e p99 s"]


def table(full: BenchmarkRun, short: BenchmarkRun, predicted_cost: float | None) -> str:
    """The comparison as a printable table."""
    rows = []
    for level in short.levels:
        for label, run in (("full", full), ("shortened", short)):
            r = run.levels.get(level)
            if r is None:
                continue
            rows.append(
                [
                    level,
                    label,
                    f"{r.output_tokens_per_s:.1f}",
                    f"{r.requests_per_s:.2f}",
                    f"{1000 * r.ttft_s['0.5']:.0f}",
                    f"{1000 * r.tpot_s['0.5']:.1f}" if "0.5" in r.tpot_s else "-",
                    f"{r.e2e_s['0.5']:.2f}",
                    f"{r.e2e_s['0.99']:.2f}",
                ]
            )
    lines = [markdown_table(TABLE_HEADER, rows, align="rlrrrrrr"), ""]
    if full.kv_cache_tokens and short.kv_cache_tokens:
        lines.append(
            f"KV cache: full {full.kv_cache_tokens:,} tokens, shortened {short.kv_cache_tokens:,} tokens in the same "
            f"memory ({short.kv_cache_tokens / full.kv_cache_tokens:.2f}x)"
        )
    for level, q in ratios(full, short, predicted_cost).items():
        ideal = f" of an ideal {q['ideal_speedup']:.2f}x ({q['efficiency']:.0%} realised)" if "efficiency" in q else ""
        lines.append(
            f"concurrency {level}: speedup {q['speedup']:.2f}x{ideal}, latency saving {q['latency_saving']:.0%}"
        )
    return "\n".join(lines)


def engine_log_path(cache_dir: Path, model_name: str) -> Path:
    """A new log file for a private benchmark engine in the cache's ``logs/``; the oldest beyond
    :data:`KEEP_LOGS` are removed."""
    folder = cache_dir / LOGS
    with contextlib.suppress(OSError):
        old = sorted(folder.glob("benchmark-*.log"), key=lambda p: p.stat().st_mtime)
        for stale in old[: max(0, len(old) - KEEP_LOGS + 1)]:
            stale.unlink(missing_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", model_name)
    return folder / f"benchmark-{safe}-{stamp}-{os.getpid()}.log"


def measure_model(
    model_dir: Path,
    cfg: ServeConfig,
    model_name: str,
    workload: Workload,
    stop: threading.Event | None = None,
    *,
    trust_remote_code: bool = False,
    log_path: Path | None = None,
) -> BenchmarkRun:
    """Start an engine on ``model_dir`` on a private loopback port, run ``workload``, stop it.

    The engine's output goes to ``log_path`` (named in one line; its tail is logged if the engine or the workload
    fails), or to the launcher's own output when None. Raises :class:`Stopped` when ``stop`` is set
    (SIGTERM/SIGINT) before the measurement finished.
    """
    from shortgpt_serve.serving.serve import free_loopback_port, log_tail, start_engine

    private = dataclasses.replace(cfg, host="127.0.0.1", port=free_loopback_port(), api_key=None)
    log.info("Benchmark: starting a private engine for %s on port %d", model_name, private.port)
    if log_path is not None:
        log.info("Benchmark engine log: %s", log_path)
    engine = start_engine(model_dir, private, model_name, trust_remote_code=trust_remote_code, log_path=log_path)
    try:
        engine.wait_ready(cfg.health_timeout, stop)
        if stop is not None and stop.is_set():
            raise Stopped
        kv = kv_cache_tokens(engine.base_url)
        return dataclasses.replace(run_workload(engine.base_url, model_name, workload, stop=stop), kv_cache_tokens=kv)
    except ServeError:
        tail = "" if log_path is None else log_tail(log_path)
        if tail:
            log.error("The benchmark engine for %s failed; the end of its log (%s):\n%s", model_name, log_path, tail)
        raise
    finally:
        engine.stop(cfg.stop_timeout)


INFO_LINE = re.compile(r"^vllm:cache_config_info\{(?P<labels>.*)\}\s", re.MULTILINE)
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def kv_capacity(metrics_text: str) -> int | None:
    """Tokens the KV cache holds, from vLLM's ``vllm:cache_config_info`` (num_gpu_blocks x block_size)."""
    m = INFO_LINE.search(metrics_text)
    if m is None:
        return None
    labels = dict(LABEL.findall(m.group("labels")))
    try:
        return int(labels["num_gpu_blocks"]) * int(labels["block_size"])
    except (KeyError, ValueError):
        return None


def kv_cache_tokens(base_url: str) -> int | None:
    """:func:`kv_capacity` of a running engine (None when its /metrics does not say)."""
    import urllib.request

    try:
        with urllib.request.urlopen(f"{base_url}/metrics", timeout=10) as resp:
            return kv_capacity(resp.read().decode("utf-8", "replace"))
    except OSError:
        return None


@dataclass
class Comparison:
    """The startup comparison of one served checkpoint with its full model: what to run, and what was found."""

    mode: str
    serve_cfg: ServeConfig
    cache: ResultCache
    workload: Workload
    full_key: dict[str, Any]
    short_key: dict[str, Any]
    full_name: str
    served_name: str
    predicted_cost: float | None
    auto_max_bytes: float = 0.0
    full: BenchmarkRun | None = None
    short: BenchmarkRun | None = None
    skipped: str | None = None
    """Why ``auto`` measured nothing (said once), or None."""

    @classmethod
    def plan(
        cls,
        bench: BenchmarkConfig,
        serve_cfg: ServeConfig,
        cache_dir: Path,
        checkpoint: Path,
        provenance: Provenance,
        served_name: str,
        engine: tuple[str, str],
    ) -> Comparison:
        config = json.loads((checkpoint / "config.json").read_text())
        vocab = int(config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size") or 32000)
        workload = Workload.from_config(bench, vocab)
        settings = engine_settings(*engine, serve_cfg)
        return cls(
            mode=bench.mode,
            serve_cfg=serve_cfg,
            cache=ResultCache(cache_dir),
            workload=workload,
            full_key=result_key(provenance.source.sha256, settings, workload),
            short_key=result_key(provenance.checkpoint_sha256(), settings, workload),
            full_name=provenance.source.name,
            served_name=served_name,
            predicted_cost=None if provenance.selection is None else provenance.selection.cost_ratio,
            auto_max_bytes=bench.auto_max_gb * 1e9,
        )

    def _too_big(self, model_dir: Path) -> bool:
        """With ``auto``: whether measuring ``model_dir`` would cost a cold boot of a large model before serving;
        the reason is said once."""
        if self.mode != "auto":
            return False
        size = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
        if size <= self.auto_max_bytes:
            return False
        if self.skipped is None:
            self.skipped = (
                f"the full model's weights are {size / 1e9:.0f} GB (above benchmark.auto_max_gb "
                f"{self.auto_max_bytes / 1e9:g}), so measuring before serving would add cold engine boots"
            )
            log.warning(
                "Benchmark: skipped: %s. Serving first; --compare measure runs it anyway (cached, so later starts "
                "reuse it), and --shadow-url compares on live traffic.",
                self.skipped,
            )
        return True

    def _cached(self, key: dict[str, Any], what: str) -> BenchmarkRun | None:
        if self.mode not in ("reuse", "auto"):
            return None
        found = self.cache.load(key)
        if found is not None:
            age_h = (time.time() - found.measured_at) / 3600
            log.info(
                "Benchmark: reusing the %s model's results measured %.1f h ago (--compare measure redoes it)",
                what,
                age_h,
            )
        return found

    def measure_full(self, model_dir: Path | None, stop: threading.Event, *, trust_remote_code: bool = False) -> None:
        """The full model's results: from the cache, or measured on a private engine before serving starts."""
        self.full = self._cached(self.full_key, "full")
        if self.full is not None:
            return
        if model_dir is None:
            log.warning("Benchmark: the full model is not available here; serving without the comparison")
            return
        if self._too_big(model_dir):
            return
        log.info("Benchmark: measuring the full model first (%s; %s)", self.workload.describe(), HOW)
        run = measure_model(
            model_dir,
            self.serve_cfg,
            self.full_name,
            self.workload,
            stop,
            trust_remote_code=trust_remote_code,
            log_path=engine_log_path(self.cache.cache_dir, self.full_name),
        )
        self.full = dataclasses.replace(run, how=HOW)
        self.cache.store(self.full_key, self.full)

    def measure_shortened(self, checkpoint: Path, stop: threading.Event, *, trust_remote_code: bool = False) -> None:
        """The shortened model's results: from the cache, or measured on a private engine like the full model's,
        before the serving engine starts (so live traffic never mixes with the measurement)."""
        self.short = self._cached(self.short_key, "shortened")
        if self.short is not None or self.full is None or self._too_big(checkpoint):
            return  # without the full model's results there is nothing to compare with
        log.info("Benchmark: measuring the shortened model (%s)", self.workload.describe())
        run = measure_model(
            checkpoint,
            self.serve_cfg,
            self.served_name,
            self.workload,
            stop,
            trust_remote_code=trust_remote_code,
            log_path=engine_log_path(self.cache.cache_dir, self.served_name),
        )
        self.short = dataclasses.replace(run, how=HOW)
        self.cache.store(self.short_key, self.short)

    def table(self) -> str:
        if not (self.full and self.short):
            return ""
        return table(self.full, self.short, self.predicted_cost)
