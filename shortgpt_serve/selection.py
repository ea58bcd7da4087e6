"""Depth selection: how many layers to remove to meet the latency budget without falling below the accuracy floor.

Cost is predicted from the model's own shapes, per generated token: every decoder layer costs
2 x the parameters a token uses in matmul FLOPs (an MoE layer's routed experts counted ``num_experts_per_tok``
at a time) plus its attention over ``context`` cached tokens; the LM head costs 2 x vocab x hidden (the embedding
lookup is free, and tied weights are counted once in parameter totals). Quantized weights count unpacked.
The latency budget is the most the shortened model may cost as a fraction of the full model.

A *plan* lists, for each depth n, which layers a criterion removes (``plan[n]``). The latency budget fixes the
fewest layers that meet it; quality, measured by an evaluator on real benchmarks, is assumed to fall roughly
monotonically with depth, so a binary search finds the deepest plan that keeps the accuracy floor in
O(log L) evaluations.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from shortgpt_serve.errors import BudgetError, ConfigError, ModelError
from shortgpt_serve.models.params import active_params_by_layer, param_counts
from shortgpt_serve.models.weights import params_by_layer
from shortgpt_serve.monotone import fit_retained, lower_bound

Evaluator = Callable[[list[int]], dict[str, Any]]
"""Measures a candidate (the layers it removes); returns at least ``{"retained": float}``."""


@dataclass(frozen=True)
class CostModel:
    """Predicted per-token cost (FLOPs) of each decoder layer and of everything else.

    Parameters are the stored ones (every expert of an MoE layer, quantized weights unpacked); FLOPs count the
    parameters a token uses (``num_experts_per_tok`` routed experts, the router and any shared experts)."""

    layer_flops: list[float]
    head_flops: float
    layer_params: list[int]
    other_params: int

    @property
    def full_flops(self) -> float:
        return sum(self.layer_flops) + self.head_flops

    @property
    def full_params(self) -> int:
        return sum(self.layer_params) + self.other_params

    def cost_ratio(self, removed: list[int] | set[int]) -> float:
        gone = set(removed)
        kept = sum(f for i, f in enumerate(self.layer_flops) if i not in gone)
        return (kept + self.head_flops) / self.full_flops

    def params(self, removed: list[int] | set[int]) -> int:
        gone = set(removed)
        return self.full_params - sum(p for i, p in enumerate(self.layer_params) if i in gone)

    @classmethod
    def from_checkpoint(cls, folder: Path, config: dict[str, Any], layers_prefix: str, context: int) -> CostModel:
        n = int(config["num_hidden_layers"])
        counts = param_counts(folder, config)
        layer_params, other = params_by_layer(counts, layers_prefix, n)
        active = active_params_by_layer(counts, layers_prefix, n, config)
        text = config.get("text_config", config)
        try:
            hidden = int(text["hidden_size"])
            vocab = int(text["vocab_size"])
            heads = int(text["num_attention_heads"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"{folder}/config.json lacks {exc} needed to predict cost.") from exc
        head_dim = int(text.get("head_dim") or hidden // heads)
        # Per token: QK^T and attention x V over `context` positions, 2 FLOPs per multiply-add each.
        attention = 4.0 * heads * head_dim * context
        return cls(
            layer_flops=[2.0 * p + attention for p in active],
            head_flops=2.0 * vocab * hidden,
            layer_params=layer_params,
            other_params=other,
        )


# --- plans: which layers go at each depth ---------------------------------------------------------------------


def removable(num_layers: int, keep_first: int = 1, keep_last: int = 1) -> list[int]:
    return list(range(keep_first, num_layers - keep_last))


def removal_order(bi: list[float], keep_first: int = 1, keep_last: int = 1) -> list[int]:
    """Removable layers, least influential first (ties broken by index)."""
    return sorted(removable(len(bi), keep_first, keep_last), key=lambda i: (bi[i], i))


def plan_from_order(order: list[int]) -> list[list[int]]:
    """Depth n removes the first n layers of ``order`` (nested plans: BI, iterative BI, baselines)."""
    return [sorted(order[:n]) for n in range(len(order) + 1)]


def plan_bi(bi: list[float], keep_first: int = 1, keep_last: int = 1) -> list[list[int]]:
    return plan_from_order(removal_order(bi, keep_first, keep_last))


def plan_angular(distances: list[list[float]], keep_first: int = 1, keep_last: int = 1) -> list[list[int]]:
    """Depth n removes the contiguous block [l, l+n) whose ends are closest in angle (Gromov et al.)."""
    num_layers = len(distances) - 1
    plans: list[list[int]] = [[]]
    for n in range(1, len(removable(num_layers, keep_first, keep_last)) + 1):
        starts = range(keep_first, num_layers - keep_last - n + 1)
        start = min(starts, key=lambda s: (distances[s][s + n], s))
        plans.append(list(range(start, start + n)))
    return plans


# --- candidates and the choice --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """One possible depth: ``n_removed`` layers removed by the criterion."""

    n_removed: int
    removed: list[int]
    cost_ratio: float
    params: int
    meets_budget: bool
    quality: dict[str, Any] | None = None
    """Measured quality (None where not evaluated); ``quality["retained"]`` is compared with the floor."""


@dataclass(frozen=True)
class Selection:
    removed: list[int]
    budget: float
    cost_ratio: float
    params_full: int
    params_short: int
    num_layers: int
    candidates: list[Candidate]
    reason: str
    criterion: str = "bi"
    min_quality: float | None = None
    quality: dict[str, Any] | None = None
    latency_met: bool = True
    quality_met: bool | None = None
    """None when quality was not measured."""

    @property
    def kept(self) -> list[int]:
        return [i for i in range(self.num_layers) if i not in set(self.removed)]

    @property
    def n_removed(self) -> int:
        return len(self.removed)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def candidates(plan: list[list[int]], cost: CostModel, budget: float) -> list[Candidate]:
    rows = []
    for n, removed in enumerate(plan):
        ratio = cost.cost_ratio(removed)
        rows.append(Candidate(n, list(removed), round(ratio, 6), cost.params(removed), ratio <= budget + 1e-12))
    return rows


def _fmt_q(q: dict[str, Any] | None) -> str:
    if q is None:
        return "not measured"
    text = f"{q['retained']:.3f}"
    if q.get("retained_ci"):
        lo, hi = q["retained_ci"]
        text += f" (95% CI {lo:.3f}-{hi:.3f})"
    fit = q.get("retained_fit")
    if fit is not None and abs(fit - q["retained"]) >= 0.0005:
        text += f", {fit:.3f} read with its neighbours (monotone fit)"
    if q.get("kl") is not None:
        text += f", KL {q['kl']:.3f} nats/token, top-1 agreement {q['agreement']:.3f}"
    return text


DECIDE = {
    "fit": " (quality read as the monotone fit of every depth measured)",
    "lower-bound": " (quality read as the lower end of its 95% interval)",
    "point": "",
}
"""How a measured quality retained meets the floor, and how the reason says so."""


@dataclass(frozen=True)
class Floors:
    """What a candidate must keep: quality retained (multiple choice), and optionally the distribution measures
    against the full model on held-out text."""

    min_quality: float
    max_kl: float | None = None
    min_agreement: float | None = None

    def misses(self, q: dict[str, Any], retained: float | None = None, what: str = "quality retained") -> list[str]:
        """The floors the record ``q`` misses, as phrases (empty: it holds them all). ``retained`` replaces
        ``q["retained"]`` (e.g. its lower confidence bound), named ``what`` in the phrase."""
        out = []
        value = float(q["retained"]) if retained is None else retained
        if not value >= self.min_quality:
            out.append(f"{what} {value:.3f} < --min-quality {self.min_quality:.2f}")
        if self.max_kl is not None and not (q.get("kl") is not None and q["kl"] <= self.max_kl):
            out.append(f"KL {q.get('kl')} > --max-kl {self.max_kl}")
        if self.min_agreement is not None and not (
            q.get("agreement") is not None and q["agreement"] >= self.min_agreement
        ):
            out.append(f"top-1 agreement {q.get('agreement')} < --min-agreement {self.min_agreement}")
        return out

    def describe(self) -> str:
        text = f"the floor {self.min_quality:.2f}"
        if self.max_kl is not None:
            text += f", KL at most {self.max_kl}"
        if self.min_agreement is not None:
            text += f", top-1 agreement at least {self.min_agreement}"
        return text


def select_depth(
    plan: list[list[int]],
    cost: CostModel,
    budget: float,
    *,
    criterion: str = "bi",
    evaluate: Evaluator | None = None,
    min_quality: float | None = None,
    strict: bool = False,
    describe: Callable[[list[Candidate]], str] | None = None,
    max_kl: float | None = None,
    min_agreement: float | None = None,
    decide: str = "fit",
    confirm: int = 1,
) -> Selection:
    """Choose a depth from ``plan``.

    Without ``evaluate``: the fewest layers whose predicted cost is within ``budget``. With it: that depth if its
    measured quality keeps ``min_quality`` (and ``max_kl``, ``min_agreement`` when set: :class:`Floors`);
    otherwise the deepest plan that keeps the floor (binary search), with the missed latency budget reported, or
    a :class:`BudgetError` when ``strict``. ``describe`` renders the candidate table for that error.

    ``decide`` says how a measured quality retained is compared with the floor: ``fit`` (the non-increasing fit of
    every depth measured, :mod:`shortgpt_serve.monotone`), ``lower-bound`` (the lower end of its 95% interval) or
    ``point`` (the measurement alone). The binary search assumes quality falls with depth; once it ends, up to
    ``confirm`` more depths are measured on each side of the boundary it found (and the budget depth, when it
    holds, is confirmed by its shallower neighbour), every depth measured is read again with all the others, and
    the deepest one that holds is chosen.
    """
    if decide not in DECIDE:
        raise ConfigError(f"--decide must be one of {', '.join(DECIDE)}, got {decide!r}.", param="--decide")
    if not 0.0 < budget <= 1.0:
        raise ConfigError(f"--budget must be in (0, 1], got {budget}.", param="--budget")
    if plan and any(i >= len(cost.layer_flops) for removed in plan for i in removed):
        raise ModelError(f"the plan names layers the model does not have ({len(cost.layer_flops)} layers).")
    rows = candidates(plan, cost, budget)
    n_budget = next((c.n_removed for c in rows if c.meets_budget), None)
    if n_budget is None:
        deepest = rows[-1]
        raise ConfigError(
            f"--budget {budget} cannot be met: removing every removable layer ({deepest.n_removed} of "
            f"{len(cost.layer_flops)}) still costs {deepest.cost_ratio:.3f} of the full model (the embeddings/LM head "
            f"remain); raise --budget to at least {deepest.cost_ratio:.3f}.",
            param="--budget",
        )
    what = {"bi": "lowest-BI layers", "iterative-bi": "lowest-BI layers (re-profiled after each)"}.get(
        criterion, "layers of the closest-angle block"
    )

    def done(n: int, reason: str, *, latency_met: bool, quality_met: bool | None) -> Selection:
        c = rows[n]
        return Selection(
            removed=c.removed,
            budget=budget,
            cost_ratio=c.cost_ratio,
            params_full=cost.full_params,
            params_short=c.params,
            num_layers=len(cost.layer_flops),
            candidates=rows,
            reason=reason,
            criterion=criterion,
            min_quality=min_quality if evaluate else None,
            quality=c.quality,
            latency_met=latency_met,
            quality_met=quality_met,
        )

    over = f"; removing {n_budget - 1} would cost {rows[n_budget - 1].cost_ratio:.3f}, over it" if n_budget > 0 else ""
    if evaluate is None or min_quality is None or n_budget == 0:
        if n_budget == 0:
            return done(
                0,
                f"The full model already meets the budget {budget:.2f}; no layer removed.",
                latency_met=True,
                quality_met=None,
            )
        reason = (
            f"Removing the {n_budget} {what} {rows[n_budget].removed} predicts a cost of "
            f"{rows[n_budget].cost_ratio:.3f} of the full model, within the budget {budget:.2f}{over}. "
            "Quality was not measured."
        )
        return done(n_budget, reason, latency_met=True, quality_met=None)

    floors = Floors(min_quality, max_kl, min_agreement)
    confirm = confirm if decide == "fit" else 0  # only the fit reads a depth with its neighbours

    def measured() -> dict[int, dict[str, Any]]:
        return {c.n_removed: c.quality for c in rows if c.quality is not None and c.n_removed}

    def misses(n: int) -> list[str]:
        """The floors depth ``n`` misses, read the way ``decide`` says, given every depth measured so far."""
        q = rows[n].quality
        assert q is not None
        if decide == "lower-bound":
            return floors.misses(q, lower_bound(q), "the lower 95% bound of quality retained")
        if decide == "fit":
            fitted = fit_retained(measured())[n]
            if abs(fitted - float(q["retained"])) >= 0.0005:
                return floors.misses(q, fitted, "quality retained read with its neighbours (monotone fit)")
        return floors.misses(q)

    def holds(n: int) -> bool:
        if rows[n].quality is None:
            rows[n] = replace(rows[n], quality=evaluate(rows[n].removed))
        return not misses(n)

    def annotate() -> None:
        """Write the monotone fit beside each measured depth's own figure (the table and the reason show it)."""
        if decide == "fit":
            for n, value in fit_retained(measured()).items():
                rows[n] = replace(rows[n], quality={**rows[n].quality, "retained_fit": round(value, 6)})  # type: ignore[dict-item]

    # The budget depth holds only if its shallower neighbour, read with it, does not pull it under the floor.
    if holds(n_budget) and confirm and n_budget > 1:
        holds(n_budget - 1)
    if holds(n_budget):
        annotate()
        reason = (
            f"Removing the {n_budget} {what} {rows[n_budget].removed} predicts a cost of "
            f"{rows[n_budget].cost_ratio:.3f} of the full model, within the budget {budget:.2f}{over}, and retains "
            f"{_fmt_q(rows[n_budget].quality)} of the full model's quality, above {floors.describe()}{DECIDE[decide]}."
        )
        return done(n_budget, reason, latency_met=True, quality_met=True)

    # The floor binds: binary search for the deepest plan in [0, n_budget) that keeps it (depth 0 always does).
    lo, hi = 0, n_budget
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if holds(mid):
            lo = mid
        else:
            hi = mid
    # Confirm the boundary: measure up to `confirm` more depths on each side of it, then read every depth measured
    # again with all the others; the deepest that holds is the choice.
    for n in [*range(lo - 1, max(lo - 1 - confirm, 0), -1), *range(hi + 1, min(hi + 1 + confirm, n_budget))]:
        holds(n)
    annotate()
    missed = "; ".join(misses(n_budget))
    lo = max((n for n in measured() if n < n_budget and not misses(n)), default=0)
    hi = min(n for n in [*measured(), n_budget] if n > lo)
    chosen = rows[lo]
    if strict:
        table = describe(rows) if describe else ""
        raise BudgetError(
            f"both budgets cannot be met: --budget {budget:.2f} needs {n_budget} layers removed, which misses the "
            f"floor ({missed}); the floor allows {lo} layers (cost "
            f"{chosen.cost_ratio:.3f}), so --budget {chosen.cost_ratio:.3f} would work, or lower --min-quality."
            + (f"\n{table}" if table else "")
        )
    nxt = f"; removing {hi} retains {_fmt_q(rows[hi].quality)}, below it"
    kept = (
        f"removing {lo} {what} {chosen.removed} predicts a cost of {chosen.cost_ratio:.3f} and retains "
        f"{_fmt_q(chosen.quality)}{nxt}. --budget {chosen.cost_ratio:.3f} would be met"
        if lo
        else f"no layer can be removed (the full model is served){nxt}"
    )
    reason = (
        f"LATENCY BUDGET MISSED: meeting --budget {budget:.2f} needs {n_budget} layers removed (cost "
        f"{rows[n_budget].cost_ratio:.3f}), which misses the floor ({missed}){DECIDE[decide]}. Keeping the floor "
        f"instead: {kept}; pass --strict to fail instead."
    )
    return done(lo, reason, latency_met=False, quality_met=True)
