"""What the shadow proxy costs a client: vLLM served directly vs the same engine behind the proxy.

    .venv/bin/python benchmarks/shadow_proxy.py [--rounds 3] [--concurrency 1,16] [--requests 0] \
        [--shadow-fraction 0.05]

One vLLM engine on the embedded default model (converted once into the cache). The proxy runs in its own process,
as in the launcher (its event loop does not share a GIL with the load generator), on another loopback port. Each
round runs the launcher's fixed startup workload (seeded 128-token prompts, 64 output tokens, streamed) directly
and through the proxy with shadow fraction 0 (the pure cost of the hop), alternating which goes first; with
``--shadow-fraction F`` > 0 a third variant samples that share of requests and shadows them to the same engine
(so its figures include the extra engine load of the shadow requests, not only the proxy's work). Per level it
prints the median over rounds of output tokens/s and p50 TTFT, and the proxy's cost. Targets: at most 2% fewer
output tokens/s and at most 2 ms added p50 TTFT. Results are appended to benchmarks/results/shadow_proxy.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from typing import Any

from _record import record

MAX_TPS_LOSS = 0.02
MAX_TTFT_ADDED_S = 0.002


def serve_proxy(upstream: str, port: int, fraction: float) -> None:
    """The proxy alone, until killed (the child process of the benchmark)."""
    import signal
    import threading

    from prometheus_client import CollectorRegistry

    from shortgpt_serve.serving.live import LiveComparison, LiveMetrics
    from shortgpt_serve.serving.shadow import ProxyServer, ShadowProxy, ShadowTarget

    live = LiveComparison(LiveMetrics(CollectorRegistry()), fraction, max_in_flight=8)
    target = ShadowTarget.of(upstream, None, None, 120.0)
    server = ProxyServer(ShadowProxy(upstream, target, live), "127.0.0.1", port).start()
    server.proxy.ready = True
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    print("proxy ready", flush=True)
    done.wait()
    server.stop()


def start_proxy(upstream: str, fraction: float) -> tuple[subprocess.Popen[bytes], str]:
    from shortgpt_serve.serving.serve import free_loopback_port, healthy

    port = free_loopback_port()
    cmd = [sys.executable, __file__, "--serve-proxy", upstream, str(port), str(fraction)]
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONPATH": os.getcwd()})
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while not healthy(base):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the proxy did not start (exit code {proc.poll()})")
        time.sleep(0.2)
    return proc, base


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--concurrency", default="1,16")
    p.add_argument("--requests", type=int, default=0, help="Requests per level (0: the launcher's default).")
    p.add_argument("--shadow-fraction", type=float, default=0.0, help="Also measure the proxy shadowing this share.")
    p.add_argument("--serve-proxy", nargs=3, metavar=("UPSTREAM", "PORT", "FRACTION"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve_proxy:
        upstream, port, fraction = args.serve_proxy
        serve_proxy(upstream, int(port), float(fraction))
        return

    from shortgpt_serve.config import BenchmarkConfig, Config, ServeConfig
    from shortgpt_serve.models.source import resolve_model
    from shortgpt_serve.serving.serve import free_loopback_port, start_engine
    from shortgpt_serve.serving.workload import Workload, run_workload

    source = resolve_model(None, Config().resolved_cache_dir())
    bench = BenchmarkConfig(concurrency=tuple(int(c) for c in args.concurrency.split(",")), requests=args.requests)
    workload = Workload.from_config(bench, int(source.config["vocab_size"]))
    cfg = ServeConfig(host="127.0.0.1", port=free_loopback_port())
    engine = start_engine(source.path, cfg, source.name)
    variants = ["direct", "proxy f=0"] + ([f"proxy f={args.shadow_fraction}"] if args.shadow_fraction > 0 else [])
    runs: dict[str, list[Any]] = {v: [] for v in variants}
    proxies: dict[str, tuple[subprocess.Popen[bytes], str]] = {}
    try:
        engine.wait_ready(cfg.health_timeout)
        proxies["proxy f=0"] = start_proxy(engine.base_url, 0.0)
        if args.shadow_fraction > 0:
            proxies[variants[2]] = start_proxy(engine.base_url, args.shadow_fraction)
        for i in range(args.rounds):
            order = variants if i % 2 == 0 else variants[::-1]
            for v in order:
                base = engine.base_url if v == "direct" else proxies[v][1]
                runs[v].append(run_workload(base, source.name, workload))
                level_tps = {c: f"{r.output_tokens_per_s:.1f}" for c, r in runs[v][-1].levels.items()}
                print(f"round {i + 1} {v}: output tok/s {level_tps}", flush=True)
    finally:
        for proc, _ in proxies.values():
            proc.terminate()
            proc.wait(10)
        engine.stop(20)

    def median(v: str, level: str, what: str) -> float:
        if what == "ttft":
            return statistics.median(r.levels[level].ttft_s["0.5"] for r in runs[v])
        return statistics.median(r.levels[level].output_tokens_per_s for r in runs[v])

    lines = [
        f"## {time.strftime('%Y-%m-%d %H:%M')} — {args.rounds} rounds (alternating), {workload.describe()}",
        "",
        f"One vLLM engine ({source.name}), the proxy in its own process; {os.cpu_count()} CPUs. Medians over rounds.",
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
                f"{met if v == 'proxy f=0' else '(includes shadow load)'} |"
            )
    spread = []
    for v in variants:
        for level in map(str, workload.concurrency):
            values = [
                f"{r.levels[level].output_tokens_per_s:.1f}/{1000 * r.levels[level].ttft_s['0.5']:.1f}" for r in runs[v]
            ]
            spread.append(f"{v} c{level}: " + ", ".join(values))
    lines += ["", "Per round, output tok/s / p50 TTFT ms: " + "; ".join(spread) + ".", ""]
    record("shadow_proxy", lines)


if __name__ == "__main__":
    main()
