"""What the live comparison (`--shadow-url`) costs a client: vLLM served directly vs vLLM with the shadow middleware.

    .venv/bin/python benchmarks/shadow_proxy.py [--rounds 6] [--concurrency 1,16] [--requests 0] \
        [--shadow-fraction 0.05]

Engines on the embedded default model (converted once into the cache), each started as the launcher starts it:
"direct" without a shadow, "middleware f=0" with `--shadow-url` and fraction 0 (the pure cost of the middleware: a
path check per request; at a fraction above 0, one random draw per completion too), and with ``--shadow-fraction F``
above 0 "middleware f=F", which shadows that share of requests to the "direct" engine (idle while this variant runs;
so its figures include the shadow requests' load on the same CPUs, not only the middleware's work). Each round runs
the launcher's fixed startup workload (seeded 128-token prompts, 64 output tokens, streamed) on every variant,
alternating the order.
Per level it prints the median over rounds of output tokens/s and p50 TTFT, and the difference from direct; then,
since each round runs every variant back to back, the per-round differences from direct paired within rounds, with
a 95% bootstrap interval of their mean over rounds. Targets: at most 2% fewer output tokens/s and at most 2 ms added
p50 TTFT; "met" when the interval's worse end is within the target, "missed" when its better end is outside it, and
"not resolved" otherwise. The 1-minute load average is recorded before and after. Results go on top of
benchmarks/results/shadow_proxy.md (earlier sections kept below).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time
from pathlib import Path
from typing import Any

MAX_TPS_LOSS = 0.02
MAX_TTFT_ADDED_S = 0.002
RESULTS = Path(__file__).resolve().parent / "results" / "shadow_proxy.md"
NOWHERE = "http://127.0.0.1:9"
"""The shadow of the fraction-0 engine: never asked."""


def paired_interval(diffs: list[float], resamples: int = 10000) -> tuple[float, float, float]:
    """(mean, low, high): the mean of per-round differences and its 95% percentile-bootstrap interval (seeded)."""
    rng = random.Random(0)
    means = sorted(statistics.fmean(rng.choices(diffs, k=len(diffs))) for _ in range(resamples))
    return statistics.fmean(diffs), means[int(0.025 * resamples)], means[int(0.975 * resamples) - 1]


def verdict(worst: float, best: float, limit: float) -> str:
    """Against a "no more than ``limit``" target, given the interval's worse and better ends."""
    return "met" if worst <= limit else "**missed**" if best > limit else "not resolved"


def record_on_top(lines: list[str]) -> None:
    text = "\n".join(lines)
    print(text)
    old = RESULTS.read_text() if RESULTS.exists() else ""
    RESULTS.write_text(text + "\n\n" + old)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--concurrency", default="1,16")
    p.add_argument("--requests", type=int, default=0, help="Requests per level (0: the launcher's default).")
    p.add_argument("--shadow-fraction", type=float, default=0.0, help="Also measure the middleware shadowing this.")
    args = p.parse_args()

    from shortgpt_serve.config import BenchmarkConfig, Config, ServeConfig
    from shortgpt_serve.models.source import resolve_model
    from shortgpt_serve.serving.serve import Engine, free_loopback_port, start_engine
    from shortgpt_serve.serving.workload import Workload, run_workload

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # two or three engines side by side
    load_before = os.getloadavg()[0]
    source = resolve_model(None, Config().resolved_cache_dir())
    bench = BenchmarkConfig(concurrency=tuple(int(c) for c in args.concurrency.split(",")), requests=args.requests)
    workload = Workload.from_config(bench, int(source.config["vocab_size"]))
    direct = ServeConfig(port=free_loopback_port())
    direct_url = f"http://127.0.0.1:{direct.port}"
    configs = {"direct": direct, "middleware f=0": ServeConfig(port=free_loopback_port(), shadow_url=NOWHERE)}
    shadowed = f"middleware f={args.shadow_fraction}"
    if args.shadow_fraction > 0:
        configs[shadowed] = ServeConfig(
            port=free_loopback_port(), shadow_url=direct_url, shadow_fraction=args.shadow_fraction
        )
    variants = list(configs)
    runs: dict[str, list[Any]] = {v: [] for v in variants}
    engines: dict[str, Engine] = {}
    try:
        for v, cfg in configs.items():  # one at a time: two engines loading at once on few CPUs time out
            engines[v] = start_engine(source.path, cfg, source.name)
            engines[v].wait_ready(cfg.health_timeout)
        for i in range(args.rounds):
            order = variants if i % 2 == 0 else variants[::-1]
            for v in order:
                runs[v].append(run_workload(engines[v].base_url, source.name, workload))
                level_tps = {c: f"{r.output_tokens_per_s:.1f}" for c, r in runs[v][-1].levels.items()}
                print(f"round {i + 1} {v}: output tok/s {level_tps}", flush=True)
        live = {}
        if args.shadow_fraction > 0:
            import urllib.request

            text = urllib.request.urlopen(f"{engines[shadowed].base_url}/metrics", timeout=5).read().decode()
            live = {
                line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
                for line in text.splitlines()
                if line.startswith(("shortgpt_live_sampled", "shortgpt_live_compared", "shortgpt_live_shadow"))
                and "_created" not in line
            }
    finally:
        for engine in engines.values():
            engine.stop(20)
    load_after = os.getloadavg()[0]

    def median(v: str, level: str, what: str) -> float:
        if what == "ttft":
            return statistics.median(r.levels[level].ttft_s["0.5"] for r in runs[v])
        return statistics.median(r.levels[level].output_tokens_per_s for r in runs[v])

    lines = [
        f"## {time.strftime('%Y-%m-%d %H:%M')} — middleware in vLLM, {args.rounds} rounds (alternating), "
        f"{workload.describe()}",
        "",
        f"vLLM engines ({source.name}) side by side, one per variant; {os.cpu_count()} CPUs; 1-minute load "
        f"average {load_before:.2f} before, {load_after:.2f} after. Medians over rounds.",
        "",
        "| variant | level | tok/s | tok/s vs direct | p50 TTFT ms | TTFT added ms | target met |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for level in map(str, workload.concurrency):
        base_tps, base_ttft = median("direct", level, "tps"), median("direct", level, "ttft")
        lines.append(f"| direct | {level} | {base_tps:.1f} | - | {1000 * base_ttft:.1f} | - | - |")
        for v in variants[1:]:
            tps, ttft = median(v, level, "tps"), median(v, level, "ttft")
            loss, added = 1 - tps / base_tps, ttft - base_ttft
            met = "yes" if loss <= MAX_TPS_LOSS and added <= MAX_TTFT_ADDED_S else "**no**"
            lines.append(
                f"| {v} | {level} | {tps:.1f} | {-100 * loss:+.1f}% | {1000 * ttft:.1f} | {1000 * added:+.1f} | "
                f"{met if v == 'middleware f=0' else '(includes shadow load)'} |"
            )
    lines += [
        "",
        "Paired within rounds (variant minus direct in the same round), mean over rounds [95% bootstrap interval]:",
        "",
        "| variant | level | tok/s loss | target | TTFT added ms | target |",
        "|---|---:|---:|---|---:|---|",
    ]
    for level in map(str, workload.concurrency):
        for v in variants[1:]:
            pairs = list(zip(runs["direct"], runs[v], strict=True))
            loss = paired_interval(
                [1 - m.levels[level].output_tokens_per_s / d.levels[level].output_tokens_per_s for d, m in pairs]
            )
            added = paired_interval([m.levels[level].ttft_s["0.5"] - d.levels[level].ttft_s["0.5"] for d, m in pairs])
            shadow_load = v != "middleware f=0"
            lines.append(
                f"| {v} | {level} | {100 * loss[0]:+.1f}% [{100 * loss[1]:+.1f}, {100 * loss[2]:+.1f}] | "
                f"{'-' if shadow_load else verdict(loss[2], loss[1], MAX_TPS_LOSS)} | "
                f"{1000 * added[0]:+.1f} [{1000 * added[1]:+.1f}, {1000 * added[2]:+.1f}] | "
                f"{'-' if shadow_load else verdict(added[2], added[1], MAX_TTFT_ADDED_S)} |"
            )
    spread = []
    for v in variants:
        for level in map(str, workload.concurrency):
            values = [
                f"{r.levels[level].output_tokens_per_s:.1f}/{1000 * r.levels[level].ttft_s['0.5']:.1f}" for r in runs[v]
            ]
            spread.append(f"{v} c{level}: " + ", ".join(values))
    lines += ["", "Per round, output tok/s / p50 TTFT ms: " + "; ".join(spread) + "."]
    if live:
        lines += ["", f"Live metrics of {shadowed} at the end: " + ", ".join(f"{k} {v:g}" for k, v in live.items())]
    record_on_top([*lines, ""])


if __name__ == "__main__":
    main()
