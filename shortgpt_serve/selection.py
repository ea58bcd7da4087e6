"""Depth selection: how many of the least influential layers to remove to meet the latency budget.

Cost is predicted from the model's own shapes, per generated token: every decoder layer costs
2 x its parameters in matmul FLOPs plus its attention over ``context`` cached tokens; the LM head costs
2 x vocab x hidden (the embedding lookup is free, and tied weights are counted once in parameter totals).
The budget is the most the shortened model may cost as a fraction of the full model.

The candidate table holds one row per depth so that later criteria (an accuracy floor measured on benchmarks)
can choose among the same rows.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from shortgpt_serve.errors import ConfigError, ModelError
from shortgpt_serve.weights import params_by_layer, tensor_shapes


@dataclass(frozen=True)
class CostModel:
    """Predicted per-token cost (FLOPs) of each decoder layer and of everything else."""

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
        layer_params, other = params_by_layer(tensor_shapes(folder), layers_prefix, n)
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
            layer_flops=[2.0 * p + attention for p in layer_params],
            head_flops=2.0 * vocab * hidden,
            layer_params=layer_params,
            other_params=other,
        )


@dataclass(frozen=True)
class Candidate:
    """One possible depth: the ``n`` least influential layers removed."""

    n_removed: int
    removed: list[int]
    cost_ratio: float
    params: int
    meets_budget: bool


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

    @property
    def kept(self) -> list[int]:
        return [i for i in range(self.num_layers) if i not in set(self.removed)]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def removal_order(bi: list[float], keep_first: int = 1, keep_last: int = 1) -> list[int]:
    """Removable layers, least influential first (ties broken by index)."""
    n = len(bi)
    allowed = [i for i in range(keep_first, n - keep_last)]
    return sorted(allowed, key=lambda i: (bi[i], i))


def candidates(
    bi: list[float], cost: CostModel, budget: float, keep_first: int = 1, keep_last: int = 1
) -> list[Candidate]:
    order = removal_order(bi, keep_first, keep_last)
    rows = []
    for n in range(len(order) + 1):
        removed = sorted(order[:n])
        ratio = cost.cost_ratio(removed)
        rows.append(Candidate(n, removed, round(ratio, 6), cost.params(removed), ratio <= budget + 1e-12))
    return rows


def select_depth(bi: list[float], cost: CostModel, budget: float, keep_first: int = 1, keep_last: int = 1) -> Selection:
    """Remove the fewest lowest-BI layers whose predicted cost ratio is within ``budget``."""
    if not 0.0 < budget <= 1.0:
        raise ConfigError(f"--budget must be in (0, 1], got {budget}.", param="--budget")
    if len(bi) != len(cost.layer_flops):
        raise ModelError(
            f"profile has {len(bi)} layers but the model has {len(cost.layer_flops)}; re-profile this model."
        )
    rows = candidates(bi, cost, budget, keep_first, keep_last)
    chosen = next((c for c in rows if c.meets_budget), None)
    if chosen is None:
        floor = rows[-1]
        raise ConfigError(
            f"--budget {budget} cannot be met: removing every removable layer ({floor.n_removed} of {len(bi)}) still "
            f"costs {floor.cost_ratio:.3f} of the full model (the embeddings/LM head remain); "
            f"raise --budget to at least {floor.cost_ratio:.3f}.",
            param="--budget",
        )
    if chosen.n_removed == 0:
        reason = f"The full model already meets the budget {budget:.2f}; no layer removed."
    else:
        prev = rows[chosen.n_removed - 1]
        reason = (
            f"Removing the {chosen.n_removed} lowest-BI layers {chosen.removed} predicts a cost of "
            f"{chosen.cost_ratio:.3f} of the full model, within the budget {budget:.2f}; removing "
            f"{prev.n_removed} would cost {prev.cost_ratio:.3f}, over it."
        )
    return Selection(
        removed=chosen.removed,
        budget=budget,
        cost_ratio=chosen.cost_ratio,
        params_full=cost.full_params,
        params_short=chosen.params,
        num_layers=len(bi),
        candidates=rows,
        reason=reason,
    )
