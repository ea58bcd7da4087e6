"""What profiling, the depth search and the report add to a start, on the embedded default model.

    .venv/bin/python benchmarks/cold_start.py [--budget 0.75] [--min-quality 0.85]

Runs the pipeline twice in one process against a fresh cache that already holds the converted model: the first
run scores the full model (cold), the second reuses those scores (warm). Prints each stage's time from the
report. Target: profile + search + report <= 180 s on a 2-core machine. Results are appended to
benchmarks/results/cold_start.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import tempfile
import time
from pathlib import Path

from _record import record


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--budget", type=float, default=0.75)
    p.add_argument("--min-quality", type=float, default=0.85)
    args = p.parse_args()

    from shortgpt_serve.config import Config, default_cache_dir
    from shortgpt_serve.models import resolve_model
    from shortgpt_serve.pipeline import prepare

    resolve_model(None, default_cache_dir())  # convert once, outside the measurement
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        (cache / "models").mkdir(parents=True)
        for folder in (default_cache_dir() / "models").iterdir():
            if folder.is_dir() and not folder.name.startswith("."):
                shutil.copytree(folder, cache / "models" / folder.name)
        base = Config(cache_dir=str(cache)).validate()
        config = dataclasses.replace(
            base, selection=dataclasses.replace(base.selection, budget=args.budget, min_quality=args.min_quality)
        )
        runs = []
        for label in ("cold (full model scored)", "warm (full-model scores reused)"):
            out = Path(tmp) / f"out-{len(runs)}"
            start = time.perf_counter()
            prepared = prepare(dataclasses.replace(config, output=str(out)).validate(), progress=False)
            total = time.perf_counter() - start
            import json

            timings = json.loads((out / "report.json").read_text())["timings_seconds"]
            runs.append((label, total, timings, prepared.selection))
    lines = [f"## {time.strftime('%Y-%m-%d %H:%M')} — budget {args.budget}, min quality {args.min_quality}", ""]
    for label, total, timings, sel in runs:
        stages = ", ".join(f"{k} {v:.1f} s" for k, v in timings.items())
        lines.append(
            f"- {label}: **{total:.1f} s in all** (load, profile, search, report, write); {stages}; "
            f"chose {sel.n_removed} layers removed, retained "
            f"{(sel.quality or {}).get('retained', 1.0):.3f}, latency budget met: {sel.latency_met}"
        )
    lines += [
        "",
        f"Command: `.venv/bin/python benchmarks/cold_start.py --budget {args.budget} --min-quality {args.min_quality}`",
        "",
    ]
    record("cold_start", lines)


if __name__ == "__main__":
    main()
