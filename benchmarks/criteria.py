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

    import torch

    from shortgpt_serve.config import Config, QualityConfig
    from shortgpt_serve.models import load_model, load_tokenizer, resolve_model
    from shortgpt_serve.pipeline import QualityMeter, _profile, calibration_set, iterative_bi_order, read_calibration
    from shortgpt_serve.selection import plan_angular, plan_bi, removable

    config = Config(quality=QualityConfig(limit=args.eval_limit)).validate()
    config = dataclasses.replace(config, selection=dataclasses.replace(config.selection, criterion="angular"))
    start = time.perf_counter()
    docs = read_calibration(config)
    source = resolve_model(None, config.resolved_cache_dir())
    calib = calibration_set(config, source, docs)
    model = load_model(source, "cpu", "float32")
    profile = _profile(config, source, model, calib, progress=False)
    max_n = max(args.depths)
    order = iterative_bi_order(model, source, calib, profile.bi, config, lambda o: len(o) >= max_n, progress=False)
    model.to(torch.bfloat16)  # type: ignore[arg-type]
    meter = QualityMeter(config, source, model, load_tokenizer(source), docs.heldout)
    meter.measure_full()
    full = meter.full_record()

    allowed = removable(source.num_layers)
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
        results = {}
        for name, removed in plans.items():
            q = meter(removed)
            results[name] = q
            rows.append((n, name, removed, q))
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
