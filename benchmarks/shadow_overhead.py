"""What the shadow middleware adds to each request on vLLM's event loop, timed in process without an engine.

    .venv/bin/python benchmarks/shadow_overhead.py [--requests 400] [--blocks 9] [--chunks 64] \
        [--tokens-per-s 52.7,263.6] [--fraction 0.05]

benchmarks/shadow_proxy.py compares whole engines; on this machine their round-to-round spread (several % of
tokens/s, tens of ms of TTFT) is wider than the targets (at most 2% fewer output tokens/s, at most 2 ms added p50
TTFT). This script times the code the middleware adds, on the same kind of request. An ASGI app answers every
completion as vLLM streams one (``--chunks`` SSE events of one token each, a usage event, ``[DONE]``). It is called
directly and through :class:`ShadowMiddleware`, in alternating blocks of ``--requests`` requests on one event loop:

- ``direct``: the app alone.
- ``f=0``: through the middleware, not sampled. This is every request at ``--shadow-fraction 0``, and every
  request not drawn at any fraction.
- ``f=1``: through the middleware, every request sampled. The body is read and replayed, and every reply chunk is
  watched and parsed. The same request goes (aiohttp) to a shadow server that answers with the same chunks, and
  its reply is read and compared. The shadow server runs on its own thread and loop, standing in for the full
  model's server on another machine, so its work is not counted.

Per variant: the median over blocks of wall time per request and of time to the first reply chunk, and the CPU
time of the loop's thread per request, including the shadow request's work (each request's shadow is awaited
before the next starts). "Added" is the variant minus direct.

What that means for the end-to-end targets:
- **TTFT.** At a small fraction the median request is not sampled, so p50 TTFT gains f=0's added time to the first
  chunk.
- **Tokens/s.** At r requests/s (``--tokens-per-s`` / ``--chunks``), the loop work added per second of serving is
  r × ((1 - F) × f=0's added CPU + F × f=1's). It is counted as taken whole from the engine's compute, an upper
  bound: on a GPU node the API server has cores of its own. The default rates are direct vLLM's output tokens/s at
  concurrency 1 and 16 in benchmarks/results/shadow_proxy.md (its 2026-12-03 12:45 run).

Results go on top of benchmarks/results/shadow_overhead.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import threading
import time
from pathlib import Path
from typing import Any

MAX_TPS_LOSS = 0.02
MAX_TTFT_ADDED_S = 0.002
RESULTS = Path(__file__).resolve().parent / "results" / "shadow_overhead.md"
PATH = "/v1/completions"


def reply_chunks(n: int) -> list[bytes]:
    """The SSE events of a streamed completion as vLLM sends them: one token per event, then usage, then [DONE]."""

    def event(choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> bytes:
        body = {"id": "cmpl-0", "object": "text_completion", "created": 0, "model": "m", "choices": choices}
        body["usage"] = usage
        return b"data: " + json.dumps(body).encode() + b"\n\n"

    tokens = [
        event([{"index": 0, "text": f" w{i}", "logprobs": None, "finish_reason": None, "stop_reason": None}])
        for i in range(n)
    ]
    usage = event([], {"prompt_tokens": 128, "completion_tokens": n, "total_tokens": 128 + n})
    return [*tokens, usage, b"data: [DONE]\n\n"]


def request_body(chunks: int) -> bytes:
    prompt = list(range(1000, 1128))
    return json.dumps(
        {
            "model": "m",
            "prompt": prompt,
            "max_tokens": chunks,
            "temperature": 0.0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    ).encode()


def engine_app(chunks: list[bytes]) -> Any:
    """An ASGI app that reads the request and streams ``chunks`` back, as vLLM's completions route does."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body", False):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        for chunk in chunks:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    return app


def start_shadow_server(chunks: list[bytes]) -> tuple[str, Any]:
    """An aiohttp server on its own thread and loop that answers every completion with ``chunks``: (url, stop)."""
    from aiohttp import web

    ready = threading.Event()
    state: dict[str, Any] = {}

    async def completions(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for chunk in chunks:
            await response.write(chunk)
        await response.write_eof()
        return response

    def serve() -> None:
        loop = asyncio.new_event_loop()
        app = web.Application()
        app.router.add_post(PATH, completions)
        runner = web.AppRunner(app, access_log=None)
        loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0)
        loop.run_until_complete(site.start())
        state["port"] = runner.addresses[0][1]
        state["loop"] = loop
        ready.set()
        loop.run_forever()
        loop.run_until_complete(runner.cleanup())

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    ready.wait(30)

    def stop() -> None:
        state["loop"].call_soon_threadsafe(state["loop"].stop)
        thread.join(10)

    return f"http://127.0.0.1:{state['port']}", stop


async def one_request(app: Any, body: bytes) -> tuple[float, float]:
    """(seconds to the first reply chunk, seconds to the last message) for one request through ``app``."""
    scope = {"type": "http", "method": "POST", "path": PATH, "headers": [(b"content-type", b"application/json")]}
    messages = [{"type": "http.request", "body": body, "more_body": False}]
    start = time.perf_counter()
    first = 0.0

    async def receive() -> dict[str, Any]:
        return messages.pop() if messages else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal first
        if not first and message["type"] == "http.response.body" and message.get("body"):
            first = time.perf_counter() - start

    await app(scope, receive, send)
    return first, time.perf_counter() - start


async def block(app: Any, body: bytes, n: int, middleware: Any) -> tuple[float, float, float]:
    """Mean (time to first chunk, wall time, loop-thread CPU) per request over ``n`` requests, each request's
    shadow (if any) finished before the next starts."""
    firsts, walls = [], []
    cpu = time.thread_time()
    for _ in range(n):
        first, wall = await one_request(app, body)
        firsts.append(first)
        walls.append(wall)
        if middleware is not None:
            await middleware.drain()
    return statistics.fmean(firsts), statistics.fmean(walls), (time.thread_time() - cpu) / n


async def measure(args: argparse.Namespace, url: str, chunks: list[bytes]) -> dict[str, list[tuple[float, ...]]]:
    from prometheus_client import CollectorRegistry

    from shortgpt_serve.serving.shadow import ShadowMiddleware, ShadowSettings, ShadowTarget

    inner = engine_app(chunks)
    body = request_body(args.chunks)

    def middleware(fraction: float, registry: CollectorRegistry) -> ShadowMiddleware:
        target = ShadowTarget.of(url, None, "m", 30.0)
        return ShadowMiddleware(inner, ShadowSettings(target, fraction, 64), registry)

    registry = CollectorRegistry()
    unsampled, sampled = middleware(0.0, CollectorRegistry()), middleware(1.0, registry)
    variants = {"direct": (inner, None), "f=0": (unsampled, None), "f=1": (sampled, sampled)}
    for app, mw in variants.values():  # warm up: connections, caches
        await block(app, body, 50, mw)
    results: dict[str, list[tuple[float, ...]]] = {v: [] for v in variants}
    for i in range(args.blocks):
        order = list(variants) if i % 2 == 0 else list(variants)[::-1]
        for v in order:
            app, mw = variants[v]
            results[v].append(await block(app, body, args.requests, mw))
    compared = registry.get_sample_value("shortgpt_live_compared_requests_total", {"greedy": "true"}) or 0.0
    errors = sum(
        registry.get_sample_value("shortgpt_live_shadow_errors_total", {"reason": r}) or 0.0
        for r in ("timeout", "connection", "status")
    )
    await sampled.close()
    await unsampled.close()
    results["_counts"] = [(compared, errors)]
    return results


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--requests", type=int, default=400, help="Requests per block.")
    p.add_argument("--blocks", type=int, default=9, help="Blocks per variant (alternating order).")
    p.add_argument("--chunks", type=int, default=64, help="Output tokens per request (one SSE event each).")
    p.add_argument("--tokens-per-s", default="52.7,263.6", help="Direct vLLM output tokens/s to read costs against.")
    p.add_argument("--fraction", type=float, default=0.05, help="The shadow fraction to read costs at.")
    args = p.parse_args()

    chunks = reply_chunks(args.chunks)
    url, stop = start_shadow_server(chunks)
    try:
        results = asyncio.run(measure(args, url, chunks))
    finally:
        stop()
    compared, errors = results.pop("_counts")[0]

    def med(v: str, k: int) -> float:
        return statistics.median(r[k] for r in results[v])

    lines = [
        f"## {time.strftime('%Y-%m-%d %H:%M')} — in process, {args.blocks} blocks of {args.requests} requests per "
        f"variant (alternating), {args.chunks} streamed tokens per reply",
        "",
        f"{os.cpu_count()} CPUs; 1-minute load average {os.getloadavg()[0]:.2f} at the end. Medians over blocks of "
        f"per-request means. f=1: {compared:g} requests compared, {errors:g} shadow errors.",
        "",
        "| variant | to first chunk µs | added µs | per request µs | added µs | loop CPU µs | added µs |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    base = [med("direct", k) for k in range(3)]
    for v in results:
        cells = []
        for k in range(3):
            value = med(v, k)
            cells += [f"{1e6 * value:.1f}", "-" if v == "direct" else f"{1e6 * (value - base[k]):+.1f}"]
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    ttft_added = med("f=0", 0) - base[0]
    cpu_added = (1 - args.fraction) * (med("f=0", 2) - base[2]) + args.fraction * (med("f=1", 2) - base[2])
    lines += ["", f"Read against the targets at fraction {args.fraction:g}:", ""]
    lines.append(
        f"- p50 TTFT added (the median request is not sampled): {1e3 * ttft_added:+.4f} ms against "
        f"{1e3 * MAX_TTFT_ADDED_S:g} ms: {'met' if ttft_added <= MAX_TTFT_ADDED_S else '**missed**'}"
    )
    sampled_ttft = med("f=1", 0) - base[0]
    lines.append(
        f"- a sampled request's time to first chunk added (the body read and parsed before vLLM gets it): "
        f"{1e3 * sampled_ttft:+.4f} ms"
    )
    for tps in (float(t) for t in args.tokens_per_s.split(",")):
        rate = tps / args.chunks
        loss = rate * cpu_added
        lines.append(
            f"- at {tps:g} output tokens/s ({rate:.2f} requests/s): loop work added {1e6 * cpu_added:.1f} µs per "
            f"request, {100 * loss:.3f}% of one core, the bound on tokens/s lost, against {100 * MAX_TPS_LOSS:g}%: "
            f"{'met' if loss <= MAX_TPS_LOSS else '**missed**'}"
        )
    lines.append("")
    text = "\n".join(lines)
    print(text)
    old = RESULTS.read_text() if RESULTS.exists() else ""
    RESULTS.write_text(text + "\n" + old)


if __name__ == "__main__":
    main()
