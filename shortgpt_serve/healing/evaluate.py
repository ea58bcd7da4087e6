"""Healing in the depth search: each candidate is healed, then scored healed beside plain, in one pass.

The maps of a candidate depend on its removal, so each evaluated depth fits its own (one pass over the calibration
text per run of removed layers). The chosen removal's maps are kept for the checkpoint writer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from shortgpt_serve.healing.linear import LinearHealing, check_foldable, check_tokens, fit_linear, healed_layers

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
    check_foldable(
        str(cfg.get("model_type")),
        cfg,
        quantized="quantization_config" in cfg,
        moe=any(cfg.get(k) for k in ("num_local_experts", "num_experts", "n_routed_experts")),
    )
    check_tokens(calibration_tokens, int(cfg["hidden_size"]))


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
        key = tuple(sorted(removed))
        if key not in self.fitted:
            log.info("Healing %d layers removed (%s): %s", len(key), self.config.heal.method, list(key))
            self.fitted[key] = fit_linear(
                self._engine(), self._batches(), key, ridge=self.config.heal.ridge, progress=self.progress
            )
        return self.fitted[key]

    def __call__(self, removed: list[int]) -> dict[str, Any]:
        """The healed candidate's quality record, with the plain one beside it (``plain``) and the healing's
        record (``heal``); the plain record alone when healing is off."""
        assert self.meter is not None
        healing = self.fit(removed)
        if healing is None or not healing.maps:
            return self.meter(removed)
        plain, healed = self.meter.evaluate_many([removed, removed], [{}, healed_layers(self._engine(), healing.maps)])
        return {**healed, "plain": plain, "heal": healing.record()}
