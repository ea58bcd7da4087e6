"""The fixed benchmark workload and the client that runs it against vLLM's OpenAI completions endpoint.

Seeded token-id prompts of a fixed length, a fixed number of output tokens with end of sequence ignored, greedy;
streamed, so time to first token, time per output token, inter-token latency and end-to-end latency are measured
per request as a client sees them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import random
import threading
import time
from dataclasses import dataclass
from typing import Any

from shortgpt_serve.config import BenchmarkConfig
from shortgpt_serve.errors import ServeError
from shortgpt_serve.serving.benchrun import BenchmarkRun, LevelResult

log = logging.getLogger(__name__)

QUANTILES = (0.5, 0.9, 0.99)


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


def summarize(results: list[RequestResult], duration: float, concurrency: int = 0) -> LevelResult:
    ok = [r for r in results if r.ok]
    tokens = sum(r.output_tokens for r in ok)
    tpot = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    errors = sorted({r.error for r in results if not r.ok})
    return LevelResult(
        requests=len(results),
        failed=len(results) - len(ok),
        errors=tuple(errors[:5]),
        duration_s=duration,
        output_tokens=tokens,
        output_tokens_per_s=tokens / duration if duration > 0 else 0.0,
        requests_per_s=len(ok) / duration if duration > 0 else 0.0,
        ttft_s=_quantiles([r.ttft for r in ok]),
        tpot_s=_quantiles(tpot),
        itl_s=_quantiles([g for r in ok for g in r.itl]),
        e2e_s=_quantiles([r.e2e for r in ok]),
        concurrency=concurrency,
    )


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
) -> LevelResult:
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
    return summarize(results, duration, concurrency)


def run_workload(
    base_url: str,
    model: str,
    workload: Workload,
    api_key: str | None = None,
    stop: threading.Event | None = None,
) -> BenchmarkRun:
    """Warm the engine up, then run every level of ``workload``; the per-level summaries, keyed by concurrency.

    Raises :class:`Stopped` when ``stop`` is set, and ServeError when any request fails.
    """
    levels: dict[str, LevelResult] = {}
    warmup = workload.prompts(2)
    asyncio.run(run_level(base_url, model, warmup, min(8, workload.output_tokens), 1, api_key, stop))
    for concurrency, n in zip(workload.concurrency, workload.requests, strict=True):
        summary = asyncio.run(
            run_level(base_url, model, workload.prompts(n), workload.output_tokens, concurrency, api_key, stop)
        )
        if summary.failed:
            raise ServeError(
                f"benchmark of {model}: {summary.failed} of {summary.requests} requests failed at "
                f"concurrency {concurrency} ({'; '.join(summary.errors)}); pass --compare off to skip it."
            )
        log.info(
            "  %s, concurrency %d: %.1f output tokens/s, TTFT p50 %.0f ms, e2e p50 %.2f s",
            model,
            concurrency,
            summary.output_tokens_per_s,
            1000 * summary.ttft_s["0.5"],
            summary.e2e_s["0.5"],
        )
        levels[str(concurrency)] = summary
    return BenchmarkRun(model_name=model, measured_at=time.time(), levels=levels)
