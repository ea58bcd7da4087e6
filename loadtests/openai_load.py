"""A bounded load run against an OpenAI-compatible endpoint: throughput and latency percentiles.

    .venv/bin/python loadtests/openai_load.py --base-url http://127.0.0.1:8000/v1 --model SmolLM2-135M-Instruct-short \
        --concurrency 4 --requests 32 --max-tokens 64 [--chat] [--api-key KEY]

Every request streams, so time to first token (TTFT) and end-to-end latency are measured per request. The run
is bounded by --requests and --timeout; point it only at servers you operate.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def one(client, args, prompt: str) -> tuple[float, float, int]:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    first = None
    tokens = 0
    if args.chat:
        stream = await client.chat.completions.create(
            model=args.model,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=args.max_tokens,
            temperature=0,
            stream=True,
            extra_body={"min_tokens": args.max_tokens},
        )
    else:
        stream = await client.completions.create(
            model=args.model,
            prompt=prompt,
            max_tokens=args.max_tokens,
            temperature=0,
            stream=True,
            extra_body={"min_tokens": args.max_tokens},
        )
    async for chunk in stream:
        if chunk.choices:
            first = first or time.perf_counter()
            tokens += 1
    end = time.perf_counter()
    return (first or end) - start, end - start, tokens


async def run(args: argparse.Namespace) -> None:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=args.base_url, api_key=args.api_key or "none", timeout=args.timeout)
    prompts = [f"Write a short story about lighthouse number {i}." for i in range(args.requests)]
    sem = asyncio.Semaphore(args.concurrency)
    failures = 0

    async def guarded(p: str) -> tuple[float, float, int] | None:
        nonlocal failures
        async with sem:
            try:
                return await one(client, args, p)
            except Exception as exc:  # a failed request is counted and reported, not fatal
                failures += 1
                print(f"request failed: {type(exc).__name__}: {exc}")
                return None

    start = time.perf_counter()
    results = [r for r in await asyncio.gather(*(guarded(p) for p in prompts)) if r]
    wall = time.perf_counter() - start
    if not results:
        raise SystemExit("every request failed")
    ttft = [r[0] for r in results]
    e2e = [r[1] for r in results]
    tokens = sum(r[2] for r in results)
    print(f"requests ok/failed: {len(results)}/{failures}  concurrency: {args.concurrency}  wall: {wall:.1f} s")
    print(f"request throughput: {len(results) / wall:.2f} req/s   output: {tokens / wall:.1f} chunks/s")
    print(f"TTFT  p50 {statistics.median(ttft) * 1000:.0f} ms  p95 {percentile(ttft, 0.95) * 1000:.0f} ms")
    print(f"e2e   p50 {statistics.median(e2e) * 1000:.0f} ms  p95 {percentile(e2e, 0.95) * 1000:.0f} ms")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    p.add_argument("--model", required=True)
    p.add_argument("--api-key")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--timeout", type=float, default=120)
    p.add_argument("--chat", action="store_true", help="use /v1/chat/completions instead of /v1/completions")
    asyncio.run(run(p.parse_args()))


if __name__ == "__main__":
    main()
