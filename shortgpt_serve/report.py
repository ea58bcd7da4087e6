"""The report a person reads: the candidate table, the choice and why, and two plots.

Written beside the checkpoint (``report.md``, ``report.json``, ``bi.png``, ``quality.png``) and printed in short.
"""

from __future__ import annotations

import io
import itertools
import json
import math
from typing import Any

from shortgpt_serve.profile import LayerProfile
from shortgpt_serve.selection import Candidate, Selection
from shortgpt_serve.tables import markdown_table, text_table

REPORT_MD = "report.md"
REPORT_JSON = "report.json"
BI_PNG = "bi.png"
QUALITY_PNG = "quality.png"

RETAINED_DEFINITION = (
    "Quality retained = mean over tasks with signal of (acc_short − chance) / (acc_full − chance), each task on "
    "its primary metric; the raw ratio = mean acc_short / mean acc_full, the ratio the ShortGPT paper reports."
)


def _params(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _num(value: Any, fmt: str = ".3f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return format(value, fmt)


def _met(met: bool | None) -> str:
    return "yes" if met else "**no**"


def _retained(q: dict[str, Any]) -> str:
    text = _num(q.get("retained"))
    ci = q.get("retained_ci")
    se = q.get("retained_se")
    if ci:
        text += f" [{ci[0]:.2f}, {ci[1]:.2f}]"
    elif se is not None and not math.isnan(se):
        text += f" ±{se:.2f}"
    fit = q.get("retained_fit")
    if fit is not None and q.get("retained") is not None and abs(fit - q["retained"]) >= 0.0005:
        text += f" (fit {fit:.3f})"
    return text


def _quality_cells(q: dict[str, Any], tasks: list[str], full: bool) -> list[str]:
    cells = [_num(q.get("tasks", {}).get(t, {}).get("score")) for t in tasks]
    return [
        *cells,
        _num(q.get("perplexity"), ".2f"),
        _num(0.0 if full else q.get("kl")),
        _num(1.0 if full else q.get("agreement")),
        _num(q.get("lambada")),
        "1.000" if full else _retained(q),
        _num(1.0 if full else q.get("raw_ratio")),
    ]


def candidate_rows(selection: Selection, full: dict[str, Any] | None, tasks: list[str]) -> list[list[str]]:
    """One row per candidate that was measured (two where it was healed: plain, then healed), plus the full model
    and the chosen depth."""
    rows = []
    chosen = selection.n_removed
    for c in selection.candidates:
        if c.quality is None and c.n_removed not in (0, chosen):
            continue
        head = [",".join(map(str, c.removed)) or "—", _params(c.params), f"{c.cost_ratio:.3f}"]
        mark = " ✓" if c.n_removed == chosen else ""
        if c.n_removed == 0 and full is not None:
            rows.append([f"0{mark}", *head, *_quality_cells(full, tasks, full=True)])
            continue
        q = c.quality or {}
        if q.get("plain") is not None:
            rows.append([f"{c.n_removed} plain", *head, *_quality_cells(q["plain"], tasks, full=False)])
            rows.append([f"{c.n_removed} healed{mark}", *head, *_quality_cells(q, tasks, full=False)])
        else:
            rows.append([f"{c.n_removed}{mark}", *head, *_quality_cells(q, tasks, full=False)])
    return rows


def table_header(tasks: list[str]) -> list[str]:
    return ["removed", "layers", "params", "cost", *tasks, "ppl", "KL", "top-1", "lambada", "retained", "raw ratio"]


def describe_candidates(selection_rows: list[Candidate], full: dict[str, Any] | None, tasks: list[str]) -> str:
    """The candidate table as text, for errors raised before a Selection exists."""
    fake = Selection(
        removed=[],
        budget=1.0,
        cost_ratio=1.0,
        params_full=0,
        params_short=0,
        num_layers=0,
        candidates=selection_rows,
        reason="",
    )
    return text_table(table_header(tasks), candidate_rows(fake, full, tasks))


def noise_notes(selection: Selection, full: dict[str, Any] | None) -> list[str]:
    notes = []
    if full is not None and full.get("no_signal"):
        notes.append(
            f"No signal on {', '.join(full['no_signal'])}: the full model is within two standard errors of chance "
            "there, so quality retained leaves them out."
        )
    q = selection.quality
    if q is not None and selection.min_quality is not None:
        se = q.get("retained_se")
        ci = q.get("retained_ci")
        if ci and ci[0] <= selection.min_quality <= ci[1]:
            notes.append(
                f"The chosen depth retains {q['retained']:.3f} (95% paired bootstrap interval {ci[0]:.3f}-"
                f"{ci[1]:.3f}), which contains the floor {selection.min_quality:.2f}: the choice is within noise; "
                "raise --eval-limit for a firmer decision."
            )
        elif not ci and se is not None and not math.isnan(se) and abs(q["retained"] - selection.min_quality) < 2 * se:
            notes.append(
                f"The chosen depth retains {q['retained']:.3f} ± {se:.3f}, within two standard errors of the floor "
                f"{selection.min_quality:.2f}: raise --eval-limit for a firmer decision."
            )
    rejected = [c for c in selection.candidates if c.quality and c.n_removed > selection.n_removed]
    nearest = min(rejected, key=lambda c: c.n_removed, default=None)
    if nearest is not None and selection.min_quality is not None:
        nq = nearest.quality or {}
        ci = nq.get("retained_ci")
        if ci and ci[1] >= selection.min_quality:
            notes.append(
                f"The next measured depth ({nearest.n_removed} removed) was rejected at {_num(nq.get('retained'))}, "
                f"but its interval ({ci[0]:.3f}-{ci[1]:.3f}) reaches the floor: it may hold it too."
            )
    measured = sorted((c.n_removed, c.quality["retained"]) for c in selection.candidates if c.quality and c.n_removed)
    inversions = [(a, ra, b, rb) for (a, ra), (b, rb) in itertools.pairwise(measured) if rb > ra]
    if inversions:
        a, ra, b, rb = inversions[0]
        notes.append(
            f"Quality is not monotone in depth here ({b} removed retains {rb:.3f}, more than {ra:.3f} at {a}): "
            "differences this size are sampling noise (with --decide fit the search reads them pooled, as the "
            "monotone fit in the table's reason); raise --eval-limit to separate them."
        )
    chosen = q or {}
    plain = chosen.get("plain")
    if plain is not None:
        notes.append(
            f"Healing ({chosen.get('heal', {}).get('method', 'linear')}) at the chosen depth: retained "
            f"{_num(plain.get('retained'))} -> {_num(chosen.get('retained'))}, perplexity "
            f"{_num(plain.get('perplexity'), '.2f')} -> {_num(chosen.get('perplexity'), '.2f')}, KL "
            f"{_num(plain.get('kl'))} -> {_num(chosen.get('kl'))}."
        )
        gain = chosen.get("gain_ci")
        if gain:
            within = (
                "within noise: the item sample cannot tell them apart" if gain[0] <= 0.0 <= gain[1] else "beyond noise"
            )
            notes[-1] += (
                f" Healed minus plain retained: 95% paired interval [{gain[0]:+.3f}, {gain[1]:+.3f}] ({within})."
            )
    return notes


def short_summary(selection: Selection, full: dict[str, Any] | None, tasks: list[str]) -> str:
    lines = []
    if full is not None:
        lines.append(text_table(table_header(tasks), candidate_rows(selection, full, tasks)))
        lines += noise_notes(selection, full)
        lines.append("")
    lines.append(selection.reason)
    lines.append(
        f"Kept {selection.num_layers - selection.n_removed} of {selection.num_layers} layers, "
        f"{selection.params_short:,} of {selection.params_full:,} parameters "
        f"({selection.params_short / selection.params_full:.1%}); predicted cost {selection.cost_ratio:.3f}."
    )
    return "\n".join(lines)


def build_json(
    *,
    source: dict[str, Any],
    profile: LayerProfile,
    selection: Selection,
    full: dict[str, Any] | None,
    settings: dict[str, Any],
    timings: dict[str, float],
    context: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "source": source,
        "criterion": selection.criterion,
        "budgets": {
            "latency": selection.budget,
            "latency_met": selection.latency_met,
            "min_quality": selection.min_quality,
            "quality_met": selection.quality_met,
        },
        "choice": {
            "removed_layers": selection.removed,
            "n_removed": selection.n_removed,
            "cost_ratio": selection.cost_ratio,
            "params_full": selection.params_full,
            "params_short": selection.params_short,
            "quality": selection.quality,
            "reason": selection.reason,
        },
        "full_model": full,
        "candidates": [
            {
                "n_removed": c.n_removed,
                "removed": c.removed,
                "cost_ratio": c.cost_ratio,
                "params": c.params,
                "meets_budget": c.meets_budget,
                "quality": c.quality,
            }
            for c in selection.candidates
        ],
        "block_influence": profile.bi,
        "context": context,
        "calibration": {"source": profile.calibration_source, "tokens": profile.num_tokens, "seq_len": profile.seq_len},
        "settings": settings,
        "timings_seconds": timings,
        "definitions": {"quality_retained": RETAINED_DEFINITION},
    }


def build_markdown(report: dict[str, Any], tasks: list[str], selection: Selection) -> str:
    src = report["source"]
    choice = report["choice"]
    budgets = report["budgets"]
    n_full = selection.num_layers
    full = report["full_model"]
    asked = [
        [
            "latency (predicted cost vs full)",
            f"≤ {budgets['latency']:.2f}",
            f"{choice['cost_ratio']:.3f}",
            _met(budgets["latency_met"]),
        ]
    ]
    if budgets["min_quality"] is not None:
        got = (choice["quality"] or {}).get("retained", 1.0 if choice["n_removed"] == 0 else None)
        asked.append(["quality retained", f"≥ {budgets['min_quality']:.2f}", _num(got), _met(budgets["quality_met"])])
    lines = [
        f"# Shortening report: {src['name']}, {n_full - choice['n_removed']} of {n_full} layers",
        "",
        f"**Choice.** {choice['reason']}",
        "",
        markdown_table(["budget", "asked", "got", "met"], asked),
        "",
        "## Candidates",
        "",
    ]
    if full is not None:
        lines += [markdown_table(table_header(tasks), candidate_rows(selection, full, tasks)), ""]
        lines += [RETAINED_DEFINITION, ""]
        primaries = ", ".join(f"{t}: {full['tasks'][t]['metric']}" for t in tasks if t in full["tasks"])
        lines += [f"Primary metrics: {primaries}. Only the measured depths are listed (binary search).", ""]
        lines += [f"**Note:** {note}\n" for note in noise_notes(selection, full)]
        lines += [
            "± is the standard error of quality retained from the finite item sample (binomial, per task).",
            "",
        ]
    else:
        lines += ["Quality was not measured (quality.enabled is off): the latency budget alone decided.", ""]
    lines += [
        "## Block Influence",
        "",
        f"![Block Influence per layer]({BI_PNG})",
        "",
    ]
    if full is not None:
        lines += [f"![Quality retained vs layers removed]({QUALITY_PNG})", ""]
    if report.get("context"):
        lines += ["## Context length", "", report["context"]["summary"], ""]
    cal = report["calibration"]
    settings = report["settings"]
    lines += [
        "## How this was measured",
        "",
        f"- Criterion: {report['criterion']}; calibration: {cal['tokens']} tokens of {cal['source']} "
        f"in sequences of {cal['seq_len']}.",
    ]
    if full is not None:
        q = settings.get("quality", {})
        lines.append(
            f"- Benchmarks: {', '.join(tasks)}, {q.get('limit')} items each (seed {q.get('seed')}), 0-shot "
            f"log-likelihood, {q.get('dtype')}; perplexity on {q.get('perplexity_tokens')} held-out tokens "
            "disjoint from the calibration text."
        )
    t = report["timings_seconds"]
    lines.append("- Time: " + ", ".join(f"{k} {v:.1f} s" for k, v in t.items()) + ".")
    lines.append("")
    return "\n".join(lines)


def plot_bi(profile: LayerProfile, selection: Selection) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    removed = set(selection.removed)
    fig, ax = plt.subplots(figsize=(9, 3.6), dpi=110)
    colors = ["#d62728" if i in removed else "#1f77b4" for i in range(profile.num_layers)]
    ax.bar(range(profile.num_layers), [max(b, 1e-6) for b in profile.bi], color=colors)
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel("Block Influence (log)")
    ax.set_title(f"Block Influence per layer; red: the {len(removed)} removed")
    ax.set_xticks(range(0, profile.num_layers, max(1, profile.num_layers // 15)))
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def plot_quality(selection: Selection) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [(c.n_removed, c.quality) for c in selection.candidates if c.quality is not None and c.n_removed]
    points = sorted([(0, 1.0)] + [(n, q["retained"]) for n, q in measured])
    plain = sorted([(0, 1.0)] + [(n, q["plain"]["retained"]) for n, q in measured if q.get("plain")])
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    healed = len(plain) > 1
    ax.plot(
        [p[0] for p in points], [p[1] for p in points], "o-", color="#1f77b4", label="healed" if healed else "measured"
    )
    if healed:
        ax.plot([p[0] for p in plain], [p[1] for p in plain], "s--", color="#7f7f7f", label="plain removal")
    chosen = selection.n_removed
    got = 1.0 if chosen == 0 else (selection.quality or {}).get("retained")
    if got is not None:
        ax.plot([chosen], [got], "*", color="#2ca02c", markersize=16, label=f"chosen: {chosen} removed")
    if selection.min_quality is not None:
        ax.axhline(
            selection.min_quality, color="#d62728", linestyle="--", label=f"accuracy floor {selection.min_quality}"
        )
    n_budget = next((c.n_removed for c in selection.candidates if c.meets_budget), None)
    if n_budget is not None:
        ax.axvline(
            n_budget, color="#ff7f0e", linestyle="--", label=f"latency budget {selection.budget}: ≥ {n_budget} removed"
        )
    ax.set_xlabel("layers removed")
    ax.set_ylabel("quality retained")
    ax.set_title(f"Quality retained vs layers removed ({selection.criterion})")
    ax.legend(loc="lower left", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def report_files(
    report: dict[str, Any], tasks: list[str], profile: LayerProfile, selection: Selection
) -> dict[str, bytes]:
    files = {
        REPORT_JSON: (json.dumps(report, indent=2) + "\n").encode(),
        REPORT_MD: build_markdown(report, tasks, selection).encode(),
        BI_PNG: plot_bi(profile, selection),
    }
    if report["full_model"] is not None:
        files[QUALITY_PNG] = plot_quality(selection)
    return files
