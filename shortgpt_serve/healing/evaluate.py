"""Healing in the depth search: each candidate is healed, then scored healed beside plain, in one pass.

The maps of a candidate depend on its removal, so each evaluated depth fits its own (one pass over the calibration
text per run of removed layers). The chosen removal's maps are kept for the checkpoint writer.

``distill`` costs minutes per candidate, so it does not run inside the search. The policy: search with linear
healing; then distill the chosen depth and the next deeper one (both starting from their linear maps), score
both, and keep the deepest that holds the floors (the chosen one when neither does: its linear healing).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from shortgpt_serve.healing.distill import Distillation, distill, training_bytes
from shortgpt_serve.healing.layerwise import AUTO_RANK, distill_adapters
from shortgpt_serve.healing.linear import (
    POST_NORM_FAMILIES,
    LinearHealing,
    check_foldable,
    check_tokens,
    fit_linear,
    healed_layers,
)
from shortgpt_serve.memplan import format_size
from shortgpt_serve.placement import Resident
from shortgpt_serve.selection import Floors, Selection

if TYPE_CHECKING:
    from shortgpt_serve.config import Config
    from shortgpt_serve.models.source import ModelSource
    from shortgpt_serve.passes import Batch, PassEngine
    from shortgpt_serve.quality.meter import QualityMeter

log = logging.getLogger(__name__)


def check_healing(config: Config, source: ModelSource, calibration_tokens: int) -> None:
    """Before any model work: the model can take the maps and the calibration text can estimate them."""
    if config.heal.method == "none":
        return
    cfg = source.config
    # distill trains the layers themselves: a family the maps cannot fold into starts from plain removal.
    check_foldable(
        str(cfg.get("model_type")),
        cfg,
        quantized="quantization_config" in cfg,
        moe=any(cfg.get(k) for k in ("num_local_experts", "num_experts", "n_routed_experts")),
        fold=config.heal.method == "linear",
    )
    check_tokens(calibration_tokens, int(cfg["hidden_size"]))


TRAINING_SHARE = 0.9
"""Share of the device's free memory the kept layers' training may take before adapters are trained instead."""


def distill_rank(config: Config, engine: PassEngine, removed: Sequence[int]) -> tuple[int, str]:
    """What distillation trains (0: the kept layers themselves; N: rank-N adapters), and why: heal.distill_rank
    where set; else adapters where the layers are streamed or their training would not fit the device's free
    memory, the layers themselves otherwise."""
    if config.heal.distill_rank:
        return config.heal.distill_rank, "heal.distill_rank"
    if not isinstance(engine.placement, Resident):
        return AUTO_RANK, "the layers are streamed, and training them needs the whole model in memory"
    need, free = training_bytes(engine, removed), engine.placement.free_bytes()
    if free is not None and need > TRAINING_SHARE * free:
        return AUTO_RANK, (
            f"training the layers themselves takes {format_size(need)} beside the model, and {format_size(free)} "
            f"is free on {engine.device}"
        )
    return 0, ""


class Healer:
    """Fits (once per removal) and applies the configured healing; callable as the depth search's evaluator."""

    def __init__(
        self,
        config: Config,
        engine: Callable[[], PassEngine],
        batches: Callable[[], Sequence[Batch]],
        meter: QualityMeter | None = None,
        progress: bool = True,
    ) -> None:
        self.config, self._engine, self._batches, self.meter, self.progress = config, engine, batches, meter, progress
        self.fitted: dict[tuple[int, ...], LinearHealing] = {}

    @property
    def enabled(self) -> bool:
        return self.config.heal.method != "none"

    def fit(self, removed: Sequence[int]) -> LinearHealing | None:
        """The healing of ``removed`` (None: healing is off or nothing is removed)."""
        if not self.enabled or not removed:
            return None
        if getattr(self._engine().model.config, "model_type", None) in POST_NORM_FAMILIES:
            return None  # distill on a family the maps cannot fold into: it starts from plain removal
        key = tuple(sorted(removed))
        if key not in self.fitted:
            log.info("Healing %d layers removed (%s): %s", len(key), self.config.heal.method, list(key))
            self.fitted[key] = fit_linear(
                self._engine(),
                self._batches(),
                key,
                ridge=self.config.heal.ridge,
                objective=self.config.heal.objective,
                progress=self.progress,
            )
        return self.fitted[key]

    def __call__(self, removed: list[int]) -> dict[str, Any]:
        """The healed candidate's quality record, with the plain one beside it (``plain``) and the healing's
        record (``heal``); the plain record alone when healing is off."""
        assert self.meter is not None
        healing = self.fit(removed)
        if healing is None or not healing.maps:
            return self.meter(removed)
        plain, healed = self.meter.healed_pair(removed, healed_layers(self._engine(), healing.maps))
        return {**healed, "plain": plain, "heal": healing.record()}

    def distill(self, removed: Sequence[int]) -> Distillation:
        """Distil the kept layers of ``removed`` toward the full model, starting from its linear healing."""
        h = self.config.heal
        healing = self.fit(removed)
        start = healed_layers(self._engine(), healing.maps) if healing is not None and healing.maps else None
        engine = self._engine()
        rank, why = distill_rank(self.config, engine, removed)
        run: dict[str, Any] = {
            "start": start,
            "steps": h.distill_steps,
            "batch_size": h.distill_batch,
            "seed": h.seed,
            "progress": self.progress,
        }
        if rank:
            log.info(
                "Distilling %d layers removed: %s (%d steps, rank-%d adapters, one layer at a time: %s)",
                len(removed),
                list(removed),
                h.distill_steps,
                rank,
                why,
            )
            return distill_adapters(engine, self._batches(), removed, rank=rank, lr=h.adapter_lr, **run)
        log.info("Distilling %d layers removed: %s (%d steps)", len(removed), list(removed), h.distill_steps)
        return distill(engine, self._batches(), removed, lr=h.distill_lr, **run)

    def distilled(self, removed: list[int]) -> tuple[dict[str, Any], Distillation]:
        """The distilled candidate's quality record, with plain removal's beside it (its per-item outcomes, for
        the paired gain: from the linear step's pass, else scored in the same pass), and the distillation."""
        assert self.meter is not None
        dist = self.distill(removed)
        plain, record = self.meter.healed_pair(removed, dist.layers)
        healing = self.fitted.get(tuple(sorted(removed)))
        heal = {**dist.record(), "linear_start": None if healing is None else healing.record()}
        return {**record, "plain": plain, "heal": heal}, dist


def distill_choice(
    healer: Healer, selection: Selection, plan: list[list[int]]
) -> tuple[Selection, Distillation | None]:
    """Apply the distill policy (module docstring) to the search's choice: the deeper neighbour first when the
    latency budget was missed, then the chosen depth; the deepest distilled candidate that holds the floors wins.
    Without quality measurement the chosen depth is distilled as it is."""
    n = selection.n_removed
    if n == 0:
        return selection, None
    if healer.meter is None:
        return selection, healer.distill(selection.removed)
    sel = healer.config.selection
    floors = Floors(sel.min_quality, sel.max_kl, sel.min_agreement)
    rows = list(selection.candidates)
    depths = [n + 1, n] if not selection.latency_met and n + 1 < len(plan) else [n]
    for depth in depths:
        row = rows[depth]
        removed = list(plan[depth])
        linear = row.quality
        record, dist = healer.distilled(removed)
        plain = record["plain"]
        missed = floors.misses(record)
        log.info("Distilled %d removed: %s", depth, "; ".join(missed) or f"holds {floors.describe()}")
        if missed:
            rows[depth] = replace(row, quality={**(linear or plain), "distilled": record})
            continue
        rows[depth] = replace(row, quality=record)
        note = (
            f" Distillation then healed {depth} removed {removed} (cost {row.cost_ratio:.3f}), which retains "
            f"{record['retained']:.3f}, KL {record.get('kl')}, holding {floors.describe()}: that is served."
        )
        return (
            replace(
                selection,
                removed=removed,
                cost_ratio=row.cost_ratio,
                params_short=row.params,
                candidates=rows,
                quality=record,
                latency_met=row.meets_budget,
                quality_met=True,
                reason=selection.reason + note,
            ),
            dist,
        )
    note = " Distillation did not hold the floors at this depth; its linear healing is served."
    return replace(selection, candidates=rows, reason=selection.reason + note), None
