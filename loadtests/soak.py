"""Soak test: keep N streaming requests in flight for a fixed time; count failures, watch the launcher's memory.

    .venv/bin/python loadtests/soak.py --base-url http://127.0.0.1:8000 --model SmolLM2-135M-Instruct-short \
        --concurrency 16 --minutes 10 [--launcher-pid PID] [--api-key KEY] [--record]

Requests alternate between the completions and the chat endpoints, each streamed, with a bounded number of
output tokens. With --launcher-pid the launcher's resident memory (and that of its engine processes) is sampled
every few seconds; "flat" means the launcher grew by less than --max-growth-mib between the first and the
last quarter of the run. Exits non-zero on any failed request or on memory growth. Bounded in time and
concurrency; point it only at servers you operate. --record appends the result to benchmarks/results/soak.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import time
from pathlib import Path
from typing import Any

PROMPTS = [
    "Write a short note about the sea.",
    "List three uses of copper.",
    "Once upon a time, in a small village,",
    "Explain why the sky looks blue.",
]


async def _one(client: Any, model: str, i: int, max_tokens: int) -> int:
    """One streamed request; returns the number of streamed chunks with content."""
    prompt = PROMPTS[i % len(PROMPTS)]
    chunks = 0
    if i % 2:
        stream = await client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=max_tokens,
            stream=True,
            extra_body={"min_tokens": 1},
        )
        async for c in stream:
            chunks += bool(c.choices and c.choices[0].delta.content)
    else:
        stream = await client.completions.create(
            model=model, prompt=prompt, max_tokens=max_tokens, stream=True, extra_body={"min_tokens": 1}
        )
        async for c in stream:
            chunks += bool(c.choices and c.choices[0].text)
    return chunks


def _rss_mib(pid: int) -> tuple[float, float]:
    """Resident memory of ``pid`` and of all its descendants, MiB."""
    import psutil

    proc = psutil.Process(pid)
    own = proc.memory_info().rss
    children = 0
    for child in proc.children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            children += child.memory_info().rss
    return own / 2**20, children / 2**20


async def soak(
    base_url: str,
    model: str,
    *,
    concurrency: int,
    seconds: float,
    api_key: str | None = None,
    launcher_pid: int | None = None,
    max_tokens: int = 32,
    sample_every: float = 5.0,
) -> dict[str, Any]:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"{base_url}/v1", api_key=api_key or "none", timeout=120, max_retries=0)
    deadline = time.monotonic() + seconds
    counter = iter(range(10**9))
    latencies: list[float] = []
    failures: list[str] = []
    empty = 0
    samples: list[tuple[float, float, float]] = []

    async def worker() -> None:
        nonlocal empty
        while time.monotonic() < deadline:
            i = next(counter)
            start = time.monotonic()
            try:
                if await _one(client, model, i, max_tokens) == 0:
                    empty += 1
                latencies.append(time.monotonic() - start)
            except Exception as exc:  # every failure is counted and reported
                failures.append(f"{type(exc).__name__}: {exc}"[:200])

    async def sampler() -> None:
        t0 = time.monotonic()
        while time.monotonic() < deadline:
            if launcher_pid:
                samples.append((time.monotonic() - t0, *_rss_mib(launcher_pid)))
            await asyncio.sleep(sample_every)

    start = time.monotonic()
    await asyncio.gather(sampler(), *(worker() for _ in range(concurrency)))
    if launcher_pid:
        samples.append((time.monotonic() - start, *_rss_mib(launcher_pid)))
    await client.close()
    elapsed = time.monotonic() - start
    result: dict[str, Any] = {
        "concurrency": concurrency,
        "seconds": elapsed,
        "requests": len(latencies) + len(failures),
        "failed": len(failures),
        "failures": sorted(set(failures))[:5],
        "empty": empty,
        "requests_per_s": len(latencies) / elapsed,
        "latency_p50_s": statistics.median(latencies) if latencies else None,
        "latency_max_s": max(latencies) if latencies else None,
    }
    if samples:
        quarter = max(1, len(samples) // 4)
        first = statistics.median(s[1] for s in samples[:quarter])
        last = statistics.median(s[1] for s in samples[-quarter:])
        result.update(
            launcher_rss_first_mib=first,
            launcher_rss_last_mib=last,
            launcher_rss_growth_mib=last - first,
            launcher_rss_max_mib=max(s[1] for s in samples),
            engine_rss_first_mib=samples[0][2],
            engine_rss_last_mib=samples[-1][2],
            samples=len(samples),
        )
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", required=True, help="Server base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--model", required=True, help="Served model name.")
    p.add_argument("--api-key")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--launcher-pid", type=int, help="PID of shortgpt-serve, to watch its memory.")
    p.add_argument("--max-growth-mib", type=float, default=20.0)
    p.add_argument("--record", action="store_true", help="Append the result to benchmarks/results/soak.md.")
    args = p.parse_args(argv)
    result = asyncio.run(
        soak(
            args.base_url,
            args.model,
            concurrency=args.concurrency,
            seconds=args.minutes * 60,
            api_key=args.api_key,
            launcher_pid=args.launcher_pid,
            max_tokens=args.max_tokens,
        )
    )
    lines = [f"## {time.strftime('%Y-%m-%d %H:%M')} — soak, concurrency {args.concurrency}, {args.minutes:g} min", ""]
    lines += [f"- {k}: {v:.2f}" if isinstance(v, float) else f"- {k}: {v}" for k, v in result.items()]
    given = list(argv or sys.argv[1:])
    shown = ["KEY" if i and given[i - 1] == "--api-key" else a for i, a in enumerate(given)]  # never record the key
    lines += [f"- command: `.venv/bin/python loadtests/soak.py {' '.join(shown)}`", ""]
    text = "\n".join(lines)
    print(text)
    if args.record:
        out = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "soak.md"
        with open(out, "a") as f:
            f.write(text + "\n")
    grew = result.get("launcher_rss_growth_mib", 0.0) > args.max_growth_mib
    return 1 if result["failed"] or grew else 0


if __name__ == "__main__":
    sys.exit(main())
