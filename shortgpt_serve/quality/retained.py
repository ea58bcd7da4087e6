"""How much of the full model's quality a shortened model keeps, with the sampling noise of that share."""

from __future__ import annotations

import math
from dataclasses import dataclass

from shortgpt_serve.errors import QualityError
from shortgpt_serve.quality.scoring import TaskScore


@dataclass(frozen=True)
class Retained:
    """How much of the full model's quality the shortened model keeps, on each task's primary metric."""

    retained: float
    """Mean over tasks with signal of min(1, max(0, (short - chance) / (full - chance))): the share of the full
    model's above-chance accuracy kept. Each task's share is capped at 1, so a shortened model scoring above the
    full model on one task (sampling noise, mostly) cannot make up for a loss on another; a model that is as good
    as the full one everywhere retains 1. NaN when no task has signal."""
    raw_ratio: float
    """mean(short) / mean(full) over all tasks: the ratio the ShortGPT paper reports (chance counts as kept)."""
    per_task: dict[str, float | None]
    """Each task's retained share, in [0, 1]; None where the task carries no signal."""
    no_signal: tuple[str, ...]
    """Tasks where the full model is not clearly above chance (see :data:`SIGNAL_SE`)."""
    standard_error: float = math.nan
    """Sampling noise of ``retained`` from the finite item sample: the binomial standard error of each shortened
    score, sqrt(s (1 - s) / n), divided by the full model's margin over chance, combined over the tasks averaged.
    A floor decision within about two of these is a coin toss; more items (--eval-limit) narrow it."""


SIGNAL_SE = 2.0
"""A task carries signal when the full model beats chance by more than this many standard errors of the accuracy
of a guesser on the same n items, sqrt(c (1 - c) / n): about a one-sided 2.3% test. Below that the full model's
margin over chance is mostly noise, and a ratio with it as the denominator would be meaningless."""


def signal_margin(chance_acc: float, n: int) -> float:
    """How far above chance the full model must score for a task to count (SIGNAL_SE binomial standard errors)."""
    return SIGNAL_SE * math.sqrt(chance_acc * (1.0 - chance_acc) / max(n, 1))


def task_share(short: float, full: float, chance: float) -> float:
    """One task's retained share: the shortened model's margin over chance as a share of the full model's,
    clipped to [0, 1] (below chance keeps nothing; above the full model keeps all of it, no more)."""
    return min(1.0, max(0.0, (short - chance) / (full - chance)))


def quality_retained(full: dict[str, TaskScore], short: dict[str, TaskScore]) -> Retained:
    """Compare the shortened model's scores with the full model's, task by task (scored on the same items)."""
    if set(full) != set(short):
        raise QualityError(
            f"the full model was scored on {sorted(full)} but the shortened one on {sorted(short)}; "
            "score both on the same tasks."
        )
    if not full:
        raise QualityError("no task scores to compare; score at least one task.")
    per_task: dict[str, float | None] = {}
    variances = []
    no_signal = []
    for task in sorted(full):
        f, s = full[task], short[task]
        if f.n != s.n:
            raise QualityError(
                f"{task}: the full model was scored on {f.n} items and the shortened one on {s.n}; "
                "score both on the same items."
            )
        margin = f.score - f.chance
        if margin <= signal_margin(f.chance, f.n):
            per_task[task] = None
            no_signal.append(task)
        else:
            per_task[task] = task_share(s.score, f.score, f.chance)
            variances.append(s.score * (1.0 - s.score) / max(s.n, 1) / margin**2)
    kept = [v for v in per_task.values() if v is not None]
    mean_full = sum(full[t].score for t in full) / len(full)
    mean_short = sum(short[t].score for t in full) / len(full)
    return Retained(
        retained=sum(kept) / len(kept) if kept else math.nan,
        raw_ratio=mean_short / mean_full if mean_full > 0 else math.nan,
        per_task=per_task,
        no_signal=tuple(no_signal),
        standard_error=math.sqrt(sum(variances)) / len(variances) if variances else math.nan,
    )
