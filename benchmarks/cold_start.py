"""What profiling, scoring and the depth search add to a start, on the embedded default model; optionally side by
side with an earlier version of the tool.

    .venv/bin/python benchmarks/cold_start.py [--budget 0.75] [--min-quality 0.85] [--baseline REV] [--cold-only]

Runs `prune` twice against a fresh cache that already holds the converted model: the first run scores the full
model (cold), the second reuses those scores (warm). Prints each stage's time from the report and the choice.
With ``--baseline REV`` the same two runs are made first with the tool as it was at git revision REV (a temporary
worktree, the same virtual environment), and the ratios are printed: both versions score the same items, and the
choice must be the same. Target: cold <= 75 s on the 2-core machine the 151 s figure came from. Results are
appended to benchmarks/results/cold_start.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _record import record

ROOT = Path(__file__).resolve().parent.parent


def measure(budget: float, min_quality: float, warm: bool = True) -> list[dict[str, Any]]:
    """Cold then warm `prune` of the default model with this process's shortgpt_serve; what each run reported."""
    import dataclasses
    import shutil

    from shortgpt_serve.config import Config, default_cache_dir
    from shortgpt_serve.models import resolve_model
    from shortgpt_serve.pipeline import prepare

    resolve_model(None, default_cache_dir())  # convert once, outside the measurement
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        (cache / "models").mkdir(parents=True)
        for folder in (default_cache_dir() / "models").iterdir():
            if folder.is_dir() and not folder.name.startswith("."):
                shutil.copytree(folder, cache / "models" / folder.name)
        base = Config(cache_dir=str(cache)).validate()
        config = dataclasses.replace(
            base, selection=dataclasses.replace(base.selection, budget=budget, min_quality=min_quality)
        )
        for label in ("cold", "warm") if warm else ("cold",):
            out = Path(tmp) / f"out-{label}"
            start = time.perf_counter()
            prepared = prepare(dataclasses.replace(config, output=str(out)).validate(), progress=False)
            total = time.perf_counter() - start
            sel = prepared.selection
            runs.append(
                {
                    "label": label,
                    "total": total,
                    "timings": json.loads((out / "report.json").read_text())["timings_seconds"],
                    "removed": sel.removed,
                    "retained": (sel.quality or {}).get("retained", 1.0),
                    "latency_met": sel.latency_met,
                    "evaluated": {c.n_removed: c.quality["retained"] for c in sel.candidates if c.quality},
                }
            )
    return runs


def baseline(rev: str, budget: float, min_quality: float, warm: bool) -> list[dict[str, Any]]:
    """The same runs with the tool at ``rev``, in a subprocess on a temporary worktree."""
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "tree"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(tree), rev], check=True)
        try:
            env = {**os.environ, "PYTHONPATH": str(tree)}
            out = subprocess.run(
                [sys.executable, __file__, "--json", "--budget", str(budget), "--min-quality", str(min_quality)]
                + ([] if warm else ["--cold-only"]),
                cwd=tree,
                env=env,
                check=True,
                stdout=subprocess.PIPE,
                text=True,
            ).stdout
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False)
    result: list[dict[str, Any]] = json.loads(out.strip().splitlines()[-1])
    return result


def describe(run: dict[str, Any]) -> str:
    stages = ", ".join(f"{k} {v:.1f} s" for k, v in run["timings"].items())
    evaluated = ", ".join(f"{n}: {q:.3f}" for n, q in sorted(run["evaluated"].items(), key=lambda kv: int(kv[0])))
    return (
        f"**{run['total']:.1f} s in all** (load, profile, scoring, search, report, write); {stages}; chose "
        f"{len(run['removed'])} layers {run['removed']}, retained {run['retained']:.3f}, latency budget met: "
        f"{run['latency_met']}; candidates scored (layers removed: retained) {evaluated}"
    )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--budget", type=float, default=0.75)
    p.add_argument("--min-quality", type=float, default=0.85)
    p.add_argument("--baseline", metavar="REV", help="also run the tool at this git revision, first")
    p.add_argument("--cold-only", action="store_true", help="skip the warm run (the full model's scores cached)")
    p.add_argument("--json", action="store_true", help=argparse.SUPPRESS)  # the baseline's subprocess
    args = p.parse_args()
    warm = not args.cold_only
    if args.json:
        print(json.dumps(measure(args.budget, args.min_quality, warm)))
        return

    before = baseline(args.baseline, args.budget, args.min_quality, warm) if args.baseline else None
    now = measure(args.budget, args.min_quality, warm)
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], stdout=subprocess.PIPE, text=True)
    lines = [
        f"## {time.strftime('%Y-%m-%d %H:%M')} — budget {args.budget}, min quality {args.min_quality}, "
        f"{os.cpu_count()} CPUs",
        "",
    ]
    for run in now:
        lines.append(f"- {run['label']} (this tree, {head.stdout.strip()} + changes): {describe(run)}")
    if before is not None:
        for run in before:
            lines.append(f"- {run['label']} (baseline {args.baseline}): {describe(run)}")
        for old, new in zip(before, now, strict=True):
            same = "same choice" if old["removed"] == new["removed"] else "DIFFERENT CHOICE"
            lines.append(
                f"- {new['label']}: **{old['total'] / new['total']:.2f}x faster** than the baseline "
                f"({old['total']:.1f} s -> {new['total']:.1f} s), {same}"
            )
    lines += [
        "",
        f"Command: `.venv/bin/python benchmarks/cold_start.py --budget {args.budget} --min-quality "
        f"{args.min_quality}"
        + (f" --baseline {args.baseline}" if args.baseline else "")
        + (" --cold-only`" if args.cold_only else "`"),
        "",
    ]
    record("cold_start", lines)


if __name__ == "__main__":
    main()
