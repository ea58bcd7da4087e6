"""Served speedup of the shortened default model over the full one, divided by the FLOP-ideal speedup.

    .venv/bin/python benchmarks/served_speedup.py [--budget 0.75] [--repeats 2] [--concurrency 1,16] \
        [--vllm-arg=--max-num-seqs --vllm-arg=16] [--env VLLM_CPU_KVCACHE_SPACE=4]

Shortens the embedded default model twice at the budget: as the main command does (accuracy floor held) and on
the latency budget alone (no floor). Then starts vLLM on the full model and on each shortened one, one engine at a
time with the same settings, `--repeats` rounds in alternation (full, shortened A, shortened B, full, ...), and
runs the launcher's fixed startup workload on each. Per concurrency level it prints the median output tokens/s,
the speedup, the FLOP-ideal speedup (1 / the cost model's predicted cost ratio) and their ratio, the efficiency.
Targets: efficiency >= 0.95 at concurrency 1 and >= 0.85 at concurrency 16. Results are appended to
benchmarks/results/served_speedup.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time
from typing import Any

from _record import record

TARGETS = {"1": 0.95, "16": 0.85}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--budget", type=float, default=0.75)
    p.add_argument("--min-quality", type=float, default=0.85)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--concurrency", default="1,16")
    p.add_argument("--requests", type=int, default=0, help="Requests per level (0: the launcher's default).")
    p.add_argument("--vllm-arg", action="append", default=[], help="Extra vLLM argument (repeat for each).")
    p.add_argument("--env", action="append", default=[], help="NAME=VALUE for the engine (repeat for each).")
    p.add_argument("--only", choices=["floor", "latency"], help="Measure one of the two shortened models.")
    args = p.parse_args()
    for item in args.env:
        name, _, value = item.partition("=")
        os.environ[name] = value

    from shortgpt_serve.config import BenchmarkConfig, Config, ServeConfig
    from shortgpt_serve.pipeline import prepare
    from shortgpt_serve.serving.compare import Workload, measure_model

    base = Config().validate()
    variants = {
        "floor": dataclasses.replace(
            base, selection=dataclasses.replace(base.selection, budget=args.budget, min_quality=args.min_quality)
        ),
        "latency": dataclasses.replace(
            base,
            selection=dataclasses.replace(base.selection, budget=args.budget),
            quality=dataclasses.replace(base.quality, enabled=False),
        ),
    }
    if args.only:
        variants = {args.only: variants[args.only]}
    prepared = {name: prepare(cfg.validate(), progress=False) for name, cfg in variants.items()}
    source = next(iter(prepared.values())).source
    bench = BenchmarkConfig(concurrency=tuple(int(c) for c in args.concurrency.split(",")), requests=args.requests)
    workload = Workload.from_config(bench, int(source.config["vocab_size"]))
    serve_cfg = ServeConfig(vllm_args=tuple(args.vllm_arg))

    runs: dict[str, list[dict[str, Any]]] = {"full": [], **{name: [] for name in prepared}}
    for _ in range(args.repeats):
        runs["full"].append(measure_model(source.path, serve_cfg, source.name, workload))
        for name, prep in prepared.items():
            runs[name].append(measure_model(prep.checkpoint, serve_cfg, prep.served_model_name, workload))

    def median(name: str, level: str, key: str) -> float:
        return statistics.median(getattr(r.levels[level], key) for r in runs[name])

    lines = [
        f"## {time.strftime('%Y-%m-%d %H:%M')} — budget {args.budget}, {args.repeats} rounds, {workload.describe()}",
        "",
        f"Engine: vLLM arguments {list(args.vllm_arg) or 'none'}, environment {args.env or 'default'}; "
        f"{os.cpu_count()} CPUs.",
        "",
        "| model | layers | level | full tok/s | short tok/s | speedup | ideal | efficiency | target | met |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, prep in prepared.items():
        cost = prep.selection.cost_ratio
        kept = prep.selection.num_layers - prep.selection.n_removed
        for level in map(str, workload.concurrency):
            full_tps, short_tps = (
                median("full", level, "output_tokens_per_s"),
                median(name, level, "output_tokens_per_s"),
            )
            speedup = short_tps / full_tps
            efficiency = speedup * cost
            target = TARGETS.get(level)
            met = "" if target is None else ("yes" if efficiency >= target else "**no**")
            lines.append(
                f"| {name} | {kept}/{prep.selection.num_layers} | {level} | {full_tps:.1f} | {short_tps:.1f} | "
                f"{speedup:.3f} | {1 / cost:.3f} | {efficiency:.3f} | {target or '-'} | {met} |"
            )
    spread = []
    for name in runs:
        for level in map(str, workload.concurrency):
            values = [r.levels[level].output_tokens_per_s for r in runs[name]]
            spread.append(f"{name} c{level}: " + ", ".join(f"{v:.1f}" for v in values))
    lines += ["", "Per-round output tokens/s: " + "; ".join(spread) + ".", ""]
    record("served_speedup", lines)


if __name__ == "__main__":
    main()
