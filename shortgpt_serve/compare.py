"""Side-by-side benchmark of the full and the shortened model on the same engine and settings.

One fixed workload (seeded token-id prompts of a fixed length, a fixed number of output tokens with end of
sequence ignored, greedy) runs at each concurrency level against vLLM's OpenAI completions endpoint, streaming, so
time to first token, time per output token, inter-token latency and end-to-end latency are measured per request
as a client sees them. The full model is measured on its own engine, started with the same vLLM arguments and
environment on a private loopback port and stopped before the shortened model's engine starts: the two never run
at once, so neither steals the other's compute. Results are cached by what determines them: the model's content
hash, the engine and its settings, the machine, and the workload.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import platform
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shortgpt_serve import cache
from shortgpt_serve.version import __version__
from shortgpt_serve.config import BenchmarkConfig, ServeConfig
from shortgpt_serve.errors import CacheError, ServeError

log = logging.getLogger(__name__)

QUANTILES = (0.5, 0.9, 0.99)
HOW = "sequential: the full model's engine runs alone, then the shortened model's, with the same settings"
# Environment that changes how vLLM runs (threads, KV cache, devices), part of a result's cache key.
ENGINE_ENV_PREFIXES = ("VLLM_CPU_", "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS")


@dataclass(frozen=True)
class Workload:
    concurrency: tuple[int, ...]
    requests: tuple[int, ...]
    prompt_tokens: int
    output_tokens: int
    seed: int
    vocab_size: int

    @classmethod
    def from_config(cls, cfg: BenchmarkConfig, vocab_size: int) -> Workload:
        return cls(
            concurrency=tuple(cfg.concurrency),
            requests=tuple(cfg.requests_at(c) for c in cfg.concurrency),
            prompt_tokens=cfg.prompt_tokens,
            output_tokens=cfg.output_tokens,
            seed=cfg.seed,
            vocab_size=vocab_size,
        )

    def prompts(self, n: int) -> list[list[int]]:
        """``n`` prompts of seeded token ids, the same for both models (they share the tokenizer)."""
        rng = random.Random(self.seed)
        low = 1000 if self.vocab_size > 2000 else 0  # keep clear of the special and byte tokens at the start
        return [[rng.randrange(low, self.vocab_size) for _ in range(self.prompt_tokens)] for _ in range(n)]

    def describe(self) -> str:
        pairs = zip(self.concurrency, self.requests, strict=True)
        levels = ", ".join(f"{r} requests at concurrency {c}" for c, r in pairs)
        return f"{self.prompt_tokens} prompt tokens -> {self.output_tokens} output tokens; {levels}"


@dataclass
class RequestResult:
    ok: bool
    start: float
    ttft: float = 0.0
    e2e: float = 0.0
    output_tokens: int = 0
    itl: list[float] = dataclasses.field(default_factory=list)
    error: str = ""


def _sse_events(buffer: bytes) -> tuple[list[str], bytes]:
    """Complete ``data:`` payloads in ``buffer`` and the unfinished rest."""
    events = []
    while b"\n\n" in buffer:
        event, buffer = buffer.split(b"\n\n", 1)
        for line in event.splitlines():
            if line.startswith(b"data:"):
                events.append(line[5:].strip().decode())
    return events, buffer


async def _one_request(
    session: Any, url: str, headers: dict[str, str], model: str, prompt: list[int], output_tokens: int
) -> RequestResult:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": output_tokens,
        "min_tokens": output_tokens,
        "ignore_eos": True,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    result = RequestResult(ok=False, start=start)
    last = start
    chunks = 0
    try:
        async with session.post(url, json=body, headers=headers) as resp:
            if resp.status != 200:
                result.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return result
            buffer = b""
            async for data in resp.content.iter_any():
                buffer += data
                events, buffer = _sse_events(buffer)
                for payload in events:
                    if payload == "[DONE]":
                        continue
                    message = json.loads(payload)
                    if message.get("usage"):
                        result.output_tokens = int(message["usage"].get("completion_tokens") or 0)
                    if not message.get("choices"):
                        continue
                    now = time.perf_counter()
                    if chunks == 0:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
                    chunks += 1
        result.e2e = time.perf_counter() - start
        result.output_tokens = result.output_tokens or chunks
        result.ok = chunks > 0
        if not result.ok:
            result.error = "no tokens streamed"
    except Exception as exc:  # any failure of one request is recorded, not raised
        result.error = f"{type(exc).__name__}: {exc}"
    return result


def _quantiles(values: list[float]) -> dict[str, float]:
    import numpy as np

    if not values:
        return {}
    arr = np.asarray(values, dtype=float)
    out = {str(q): float(np.quantile(arr, q)) for q in QUANTILES}
    out["mean"] = float(arr.mean())
    return out


def summarize(results: list[RequestResult], duration: float) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    tokens = sum(r.output_tokens for r in ok)
    tpot = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    errors = sorted({r.error for r in results if not r.ok})
    return {
        "requests": len(results),
        "failed": len(results) - len(ok),
        "errors": errors[:5],
        "duration_s": duration,
        "output_tokens": tokens,
        "output_tokens_per_s": tokens / duration if duration > 0 else 0.0,
        "requests_per_s": len(ok) / duration if duration > 0 else 0.0,
        "ttft_s": _quantiles([r.ttft for r in ok]),
        "tpot_s": _quantiles(tpot),
        "itl_s": _quantiles([g for r in ok for g in r.itl]),
        "e2e_s": _quantiles([r.e2e for r in ok]),
    }


class Stopped(Exception):
    """The launcher was asked to stop while a benchmark ran."""


async def _wait_for(event: threading.Event) -> None:
    while not event.is_set():
        await asyncio.sleep(0.2)


async def run_level(
    base_url: str,
    model: str,
    prompts: list[list[int]],
    output_tokens: int,
    concurrency: int,
    api_key: str | None,
    stop: threading.Event | None = None,
) -> dict[str, Any]:
    """Send ``prompts`` keeping ``concurrency`` requests in flight; the summary of what the client measured.

    Raises :class:`Stopped` (requests in flight are cancelled) as soon as ``stop`` is set.
    """
    import aiohttp

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    url = f"{base_url}/v1/completions"
    timeout = aiohttp.ClientTimeout(total=None, sock_read=300)
    queue: asyncio.Queue[list[int]] = asyncio.Queue()
    for p in prompts:
        queue.put_nowait(p)
    results: list[RequestResult] = []
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:

        async def worker() -> None:
            while not queue.empty():
                prompt = queue.get_nowait()
                results.append(await _one_request(session, url, headers, model, prompt, output_tokens))

        start = time.perf_counter()
        work: asyncio.Future[Any] = asyncio.gather(*(worker() for _ in range(concurrency)))
        watcher: asyncio.Future[Any] = asyncio.ensure_future(_wait_for(stop or threading.Event()))
        done, _ = await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
        watcher.cancel()
        if work not in done:
            work.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await work
            raise Stopped
        duration = time.perf_counter() - start
    summary = summarize(results, duration)
    summary["concurrency"] = concurrency
    return summary


def run_workload(
    base_url: str,
    model: str,
    workload: Workload,
    api_key: str | None = None,
    stop: threading.Event | None = None,
) -> dict[str, Any]:
    """Warm the engine up, then run every level of ``workload``; the per-level summaries, keyed by concurrency.

    Raises :class:`Stopped` when ``stop`` is set, and ServeError when any request fails.
    """
    levels: dict[str, Any] = {}
    warmup = workload.prompts(2)
    asyncio.run(run_level(base_url, model, warmup, min(8, workload.output_tokens), 1, api_key, stop))
    for concurrency, n in zip(workload.concurrency, workload.requests, strict=True):
        summary = asyncio.run(
            run_level(base_url, model, workload.prompts(n), workload.output_tokens, concurrency, api_key, stop)
        )
        if summary["failed"]:
            raise ServeError(
                f"benchmark of {model}: {summary['failed']} of {summary['requests']} requests failed at "
                f"concurrency {concurrency} ({'; '.join(summary['errors'])}); pass --compare off to skip it."
            )
        log.info(
            "  %s, concurrency %d: %.1f output tokens/s, TTFT p50 %.0f ms, e2e p50 %.2f s",
            model,
            concurrency,
            summary["output_tokens_per_s"],
            1000 * summary["ttft_s"]["0.5"],
            summary["e2e_s"]["0.5"],
        )
        levels[str(concurrency)] = summary
    return {"model_name": model, "measured_at": time.time(), "levels": levels}


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


def checkpoint_digest(provenance: dict[str, Any]) -> str:
    """Content hash of a shortened checkpoint: a digest of the sha256 of each of its files."""
    files = provenance.get("files") or {}
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


class ResultCache:
    """Benchmark results as ``benchmarks`` entries of the cache: verified on read (a damaged one is removed and
    measured again), written whole under the entry's lock."""

    def __init__(self, cache_dir: Path) -> None:
        self.cache_dir = cache_dir

    def load(self, key: dict[str, Any]) -> dict[str, Any] | None:
        try:
            data = cache.load_json(self.cache_dir, "benchmarks", key)
        except CacheError as exc:
            log.warning("Benchmark results cannot be read from the cache: %s", exc.message)
            return None
        if data is not None and "levels" not in data:
            log.warning("Ignoring a malformed benchmark result in %s; measuring again", self.cache_dir / "benchmarks")
            return None
        return data

    def store(self, key: dict[str, Any], data: dict[str, Any]) -> None:
        levels = ", ".join(data.get("levels", {}))
        describe = f"{data.get('model_name')}: served benchmark at concurrency {levels}"
        try:
            cache.store_json(self.cache_dir, "benchmarks", key, data, describe=describe)
        except CacheError as exc:
            log.warning("Could not cache the benchmark result (%s); it will be measured again", exc.message)


# -- comparison ----------------------------------------------------------------------------------------------------


def ratios(full: dict[str, Any], short: dict[str, Any], predicted_cost: float | None) -> dict[str, dict[str, float]]:
    """Per concurrency level: speedup, latency saving, measured cost and speedup efficiency."""
    out: dict[str, dict[str, float]] = {}
    for level, s in short["levels"].items():
        f = full["levels"].get(level)
        if not f or not f["output_tokens_per_s"] or not s["output_tokens_per_s"]:
            continue
        speedup = s["output_tokens_per_s"] / f["output_tokens_per_s"]
        row = {
            "speedup": speedup,
            "latency_saving": 1.0 - s["e2e_s"]["0.5"] / f["e2e_s"]["0.5"],
            "measured_cost": 1.0 / speedup,
        }
        if predicted_cost:
            row["ideal_speedup"] = 1.0 / predicted_cost
            row["efficiency"] = speedup * predicted_cost
        out[level] = row
    return out


def table(full: dict[str, Any], short: dict[str, Any], predicted_cost: float | None) -> str:
    """The comparison as a printable table."""
    rows = [
        "| concurrency | model | output tok/s | req/s | TTFT p50 ms | TPOT p50 ms | e2e p50 s | e2e p99 s |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for level in short["levels"]:
        for label, run in (("full", full), ("shortened", short)):
            r = run["levels"].get(level)
            if r is None:
                continue
            rows.append(
                f"| {level} | {label} | {r['output_tokens_per_s']:.1f} | {r['requests_per_s']:.2f} | "
                f"{1000 * r['ttft_s']['0.5']:.0f} | {1000 * r['tpot_s'].get('0.5', 0.0):.1f} | "
                f"{r['e2e_s']['0.5']:.2f} | {r['e2e_s']['0.99']:.2f} |"
            )
    lines = ["\n".join(rows), ""]
    for level, r in ratios(full, short, predicted_cost).items():
        ideal = f" of an ideal {r['ideal_speedup']:.2f}x ({r['efficiency']:.0%} realised)" if "efficiency" in r else ""
        lines.append(
            f"concurrency {level}: speedup {r['speedup']:.2f}x{ideal}, latency saving {r['latency_saving']:.0%}"
        )
    return "\n".join(lines)


def measure_model(
    model_dir: Path,
    cfg: ServeConfig,
    model_name: str,
    workload: Workload,
    stop: threading.Event | None = None,
    *,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """Start an engine on ``model_dir`` on a private loopback port, run ``workload``, stop it.

    Raises :class:`Stopped` when ``stop`` is set (SIGTERM/SIGINT) before the measurement finished.
    """
    from shortgpt_serve.serve import free_loopback_port, start_engine

    private = dataclasses.replace(cfg, host="127.0.0.1", port=free_loopback_port(), api_key=None)
    log.info("Benchmark: starting a private engine for %s on port %d", model_name, private.port)
    engine = start_engine(model_dir, private, model_name, trust_remote_code=trust_remote_code)
    try:
        engine.wait_ready(cfg.health_timeout, stop)
        if stop is not None and stop.is_set():
            raise Stopped
        return run_workload(engine.base_url, model_name, workload, stop=stop)
    finally:
        engine.stop(cfg.stop_timeout)


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
    full: dict[str, Any] | None = None
    short: dict[str, Any] | None = None

    @classmethod
    def plan(
        cls,
        bench: BenchmarkConfig,
        serve_cfg: ServeConfig,
        cache_dir: Path,
        checkpoint: Path,
        provenance: dict[str, Any],
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
            full_key=result_key(provenance["source"]["sha256"], settings, workload),
            short_key=result_key(checkpoint_digest(provenance), settings, workload),
            full_name=provenance["source"]["name"],
            served_name=served_name,
            predicted_cost=(provenance.get("selection") or {}).get("cost_ratio"),
        )

    def _cached(self, key: dict[str, Any], what: str) -> dict[str, Any] | None:
        if self.mode != "reuse":
            return None
        found = self.cache.load(key)
        if found is not None:
            age_h = (time.time() - found.get("measured_at", time.time())) / 3600
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
        log.info("Benchmark: measuring the full model first (%s; %s)", self.workload.describe(), HOW)
        self.full = measure_model(
            model_dir, self.serve_cfg, self.full_name, self.workload, stop, trust_remote_code=trust_remote_code
        )
        self.full["how"] = HOW
        self.cache.store(self.full_key, self.full)

    def measure_shortened(self, checkpoint: Path, stop: threading.Event, *, trust_remote_code: bool = False) -> None:
        """The shortened model's results: from the cache, or measured on a private engine like the full model's,
        before the serving engine starts (so live traffic never mixes with the measurement)."""
        self.short = self._cached(self.short_key, "shortened")
        if self.short is not None:
            return
        log.info("Benchmark: measuring the shortened model (%s)", self.workload.describe())
        self.short = measure_model(
            checkpoint, self.serve_cfg, self.served_name, self.workload, stop, trust_remote_code=trust_remote_code
        )
        self.short["how"] = HOW
        self.cache.store(self.short_key, self.short)

    def table(self) -> str:
        if not (self.full and self.short):
            return ""
        return table(self.full, self.short, self.predicted_cost)
