"""A model's quality record: the JSON object the selection, the report and the serving metrics read."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from shortgpt_serve.quality.divergence import DivergenceStats
from shortgpt_serve.quality.lambada import GreedyScore
from shortgpt_serve.quality.retained import Retained
from shortgpt_serve.quality.scoring import TaskScore
from shortgpt_serve.quality.tasks import TASKS


@dataclass
class Measured:
    """What one pass measured for one model (the full one or a candidate)."""

    scores: dict[str, TaskScore]
    perplexity: float | None
    """Held-out perplexity (None when not measured)."""
    correct: dict[str, list[bool]]
    """Per task, each item right or not on the primary metric (what the bootstrap resamples)."""
    lambada: list[bool] | None = None
    """Each LAMBADA item's greedy last word right or not (None when not measured)."""
    divergence: DivergenceStats | None = None
    """Next-token distribution against the full model's on the held-out text (None when not measured)."""


def quality_record(
    scores: dict[str, TaskScore],
    retained: Retained | None,
    perplexity: float | None,
    *,
    divergence: DivergenceStats | None = None,
    lambada: GreedyScore | None = None,
    retained_ci: list[float] | None = None,
) -> dict[str, Any]:
    """The record: per task (accuracies, chance, n, retained share), perplexity, KL and top-1 agreement with the
    full model (``kl``, ``kl_se``, ``agreement``, ``agreement_se``), LAMBADA greedy accuracy (``lambada``,
    ``lambada_se``, ``lambada_n``), each None when not measured; with ``retained``: quality retained, its standard
    error, the raw ratio, the tasks without signal and ``retained_ci`` (95% paired bootstrap [low, high], None
    when not computed)."""
    tasks = {}
    for name, s in scores.items():
        metric = TASKS[name].primary
        tasks[name] = {
            "acc": s.acc,
            "acc_norm": s.acc_norm,
            "metric": metric,
            "score": getattr(s, metric),
            "chance": s.chance,
            "n": s.n,
            "retained": None if retained is None else retained.per_task.get(name),
        }
    record: dict[str, Any] = {
        "tasks": tasks,
        "perplexity": perplexity,
        "kl": None if divergence is None else divergence.kl,
        "kl_se": None if divergence is None else divergence.kl_se,
        "agreement": None if divergence is None else divergence.agreement,
        "agreement_se": None if divergence is None else divergence.agreement_se,
        "lambada": None if lambada is None else lambada.acc,
        "lambada_se": None if lambada is None else lambada.se,
        "lambada_n": None if lambada is None else lambada.n,
    }
    if retained is not None:
        record.update(
            retained=retained.retained,
            retained_se=retained.standard_error,
            retained_ci=retained_ci,
            raw_ratio=retained.raw_ratio,
            no_signal=list(retained.no_signal),
        )
    return record


def describe(removed: list[int], record: dict[str, Any]) -> str:
    """One log line for a candidate's record."""

    def num(key: str, fmt: str) -> str:
        value = record.get(key)
        return "not measured" if value is None else format(value, fmt)

    ci = record.get("retained_ci")
    parts = [
        f"  {len(removed)} removed: quality retained {record['retained']:.3f} ± {record['retained_se']:.3f}",
        f"95% CI [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else None,
        f"(raw ratio {record['raw_ratio']:.3f})",
    ]
    line = " ".join(p for p in parts if p)
    line += f", perplexity {num('perplexity', '.2f')}, KL {num('kl', '.4f')} nats/token"
    line += f", top-1 agreement {num('agreement', '.3f')}, LAMBADA {num('lambada', '.3f')}"
    return line
