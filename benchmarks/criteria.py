"""Does Block Influence pick better layers than the alternatives? Quality retained at equal depth, one run.

    .venv/bin/python benchmarks/criteria.py [--depths 4 8] [--seeds 3] [--eval-limit 100]

On the embedded default model, for each depth n: BI (ShortGPT), angular (Gromov et al., contiguous block),
iterative BI (re-profiled after each removal), the last n layers (before the protected final layer), and random
layers (several seeds). All use the same calibration text, the same benchmark items and the same full-model
scores. Results are appended to benchmarks/results/criteria.md.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from _record import record


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--depths", type=int, nargs="+", default=[4, 8])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--eval-limit", type=int, default=100)
    args = p.parse_args()

    import dataclasses

    from shortgpt_serve.cache import FileHashes
    from shortgpt_serve.config import Config, QualityConfig
    from shortgpt_serve.inputs import read_calibration
    from shortgpt_serve.keys import quality_key
    from shortgpt_serve.models.loading import load_tokenizer
    from shortgpt_serve.models.source import resolve_model
    from shortgpt_serve.profile import iterative_bi_order
    from shortgpt_serve.quality.meter import QualityMeter
    from shortgpt_serve.selection import plan_angular, plan_bi, removable
    from shortgpt_serve.session import ModelSession, measure_profile

    config = Config(quality=QualityConfig(limit=args.eval_limit)).validate()
    config = dataclasses.replace(config, selection=dataclasses.replace(config.selection, criterion="angular"))
    start = time.perf_counter()
    docs = read_calibration(config)
    source = resolve_model(None, config.resolved_cache_dir())
    session = ModelSession(config, source, docs)
    profile = measure_profile(session)
    max_n = max(args.depths)
    allowed = removable(source.num_layers)
    order = iterative_bi_order(
        session.engine(), session.calibration_batches(), profile.bi, allowed, lambda o: len(o) >= max_n
    )
    engine = session.engine(config.quality.dtype)
    key = quality_key(config, source, docs.heldout, FileHashes(config.resolved_cache_dir()))
    meter = QualityMeter(
        config, source, engine, load_tokenizer(source), docs.heldout, key=key, exclude=docs.calibration
    )
    meter.measure_full()
    full = meter.full_record()

    bi_plan = plan_bi(profile.bi)
    assert profile.angular is not None
    angular_plan = plan_angular(profile.angular)
    rows = []
    for n in args.depths:
        plans = {
            "bi": bi_plan[n],
            "angular": angular_plan[n],
            "iterative-bi": sorted(order[:n]),
            "last-n": allowed[-n:],
        }
        for seed in range(args.seeds):
            plans[f"random (seed {seed})"] = sorted(random.Random(seed).sample(allowed, n))
        # Every plan at this depth in one pass of the engine.
        results = dict(zip(plans, meter.evaluate_many(list(plans.values())), strict=True))
        for name, q in results.items():
            rows.append((n, name, plans[name], q))
        rand = [results[k]["retained"] for k in results if k.startswith("random")]
        rows.append(
            (
                n,
                "random (mean)",
                [],
                {"retained": statistics.mean(rand), "raw_ratio": float("nan"), "perplexity": None, "tasks": {}},
            )
        )

    tasks = list(config.quality.tasks)
    header = ["n", "criterion", "removed", "retained", "raw ratio", "ppl", *tasks]
    lines = [
        f"## {time.strftime('%Y-%m-%d %H:%M')} — {source.name}, {args.eval_limit} items per task, "
        f"{time.perf_counter() - start:.0f} s",
        "",
        "Full model: "
        + ", ".join(f"{t} {full['tasks'][t]['score']:.3f} ({full['tasks'][t]['metric']})" for t in tasks)
        + f", perplexity {full['perplexity']:.2f}; no signal: {full['no_signal'] or 'none'}",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for n, name, removed, q in rows:
        task_cells = [f"{q['tasks'][t]['score']:.3f}" if t in q.get("tasks", {}) else "" for t in tasks]
        ppl = f"{q['perplexity']:.2f}" if q.get("perplexity") else ""
        raw = "" if q["raw_ratio"] != q["raw_ratio"] else f"{q['raw_ratio']:.3f}"
        lines.append(
            f"| {n} | {name} | {','.join(map(str, removed))} | {q['retained']:.3f} | {raw} | {ppl} | "
            + " | ".join(task_cells)
            + " |"
        )
    lines += [
        "",
        f"Command: `.venv/bin/python benchmarks/criteria.py --depths {' '.join(map(str, args.depths))} "
        f"--seeds {args.seeds} --eval-limit {args.eval_limit}`",
        "",
    ]
    record("criteria", lines)


if __name__ == "__main__":
    main()
