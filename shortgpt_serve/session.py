"""One run's model work: the calibration set, the loaded model and its pass engine, built when first needed.

A cached profile, cached full-model scores and a cached checkpoint need neither the model nor the calibration
tokens, so a warm start loads nothing. :func:`cached_profile` is the profile stage behind the cache.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
from collections.abc import Callable
from math import prod
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shortgpt_serve import cache, memplan
from shortgpt_serve.calibration import CalibrationSet, Documents, batches
from shortgpt_serve.config import Config
from shortgpt_serve.inputs import calibration_set
from shortgpt_serve.memplan import Plan
from shortgpt_serve.models.loading import load_model, resolve_device, resolve_dtype
from shortgpt_serve.models.source import ModelSource
from shortgpt_serve.passes import Batch, PassEngine
from shortgpt_serve.profile import LayerProfile, profile_model
from shortgpt_serve.streaming import Streamed, empty_model

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)


class ModelSession:
    """The calibration set, the model and its engine for one run, each built when first asked for."""

    def __init__(self, config: Config, source: ModelSource, docs: Documents) -> None:
        self.config, self.source, self.docs = config, source, docs
        self._calib: CalibrationSet | None = None
        self._model: PreTrainedModel | None = None
        self._engine: PassEngine | None = None
        self._placement: Streamed | None = None
        self._device = "cpu"
        self._plan: Plan | None = None

    def calib(self) -> CalibrationSet:
        if self._calib is None:
            self._calib = calibration_set(self.config, self.source, self.docs)
        return self._calib

    def memory_plan(self) -> Plan:
        """Whether the weights are held whole or streamed (:mod:`shortgpt_serve.memplan`), from the checkpoint's
        headers and the device's free memory when first asked."""
        if self._plan is None:
            plan = self._memory_plan()
            log.info("%s", plan.describe(self.source.name, self.source.num_layers))
            self._device = resolve_device(self.config.profile.device)
            if plan.mode == "stream":  # built now: a family that cannot be streamed is refused before any work
                import torch

                device = torch.device(self._device)
                dtype = resolve_dtype(self.config.profile.dtype, self._device)
                model = empty_model(self.source.path, dtype, device, self.source.trust_remote_code)
                self._placement = Streamed(model, self.source.family, self.source.path, device, plan.ahead)
            self._plan = plan
        return self._plan

    def _memory_plan(self) -> Plan:
        import torch

        from shortgpt_serve.models.weights import layer_of, layer_pattern, params_by_layer, tensor_infos
        from shortgpt_serve.placement import free_bytes

        device = resolve_device(self.config.profile.device)
        dtype = getattr(torch, resolve_dtype(self.config.profile.dtype, device))
        size = torch.empty((), dtype=dtype).element_size()
        shapes = {name: shape for name, (_, shape) in tensor_infos(self.source.path).items()}
        prefix = self.source.family.layers_module
        per_layer, other = params_by_layer(shapes, prefix, self.source.num_layers)
        # A streamed pass brings the embeddings and the head (final norm, output embeddings) in one at a time: the
        # larger is the largest matrix outside the layers with the vectors (norms) beside it.
        pattern = layer_pattern(prefix)
        outside = [shape for name, shape in shapes.items() if layer_of(name, pattern) is None]
        unit = max((prod(s) for s in outside if len(s) > 1), default=0) + sum(prod(s) for s in outside if len(s) <= 1)
        config = self.source.config
        hidden = int(config.get("hidden_size") or config.get("text_config", {}).get("hidden_size") or 0)
        return memplan.plan(
            weights=(sum(per_layer) + other) * size,
            largest=max([*per_layer, min(unit, other)]) * size,
            states=self.config.calibration.num_tokens * hidden * size,
            memory=self.config.profile.memory,
            free=free_bytes(torch.device(device)),
            device=device,
            name=self.source.name,
        )

    def model(self) -> PreTrainedModel:
        if self._model is None:
            self.calib()  # fails on unusable text before the model is loaded
            plan = self.memory_plan()
            if plan.mode == "resident":
                log.info("Loading %s", self.source.origin)
                self._model = load_model(self.source, self._device, self.config.profile.dtype)
            else:
                assert self._placement is not None
                log.info("Streaming reads ~%.0f s of weights per pass at layer 0's read speed", self._placement.probe())
                self._model = self._placement.model
        return self._model

    def engine(self, dtype: str | None = None) -> PassEngine:
        """The pass engine over the model, in ``dtype`` (a config dtype; default: the profiling dtype)."""
        import torch

        model = self.model()
        if dtype is not None:
            model.to(getattr(torch, resolve_dtype(dtype, self._device)))
        if self._engine is None:
            self._engine = PassEngine(model, self.source.family, self._placement)
        return self._engine

    def calibration_batches(self) -> list[Batch]:
        pad = int(getattr(self.model().config, "pad_token_id", None) or 0)
        return [Batch(ids, mask) for ids, mask in batches(self.calib().sequences, self.config.profile.batch_size, pad)]

    def close(self) -> None:
        """Drop the model and return its device memory (the serving engine boots next and needs it)."""
        if self._placement is not None:
            self._placement.close()
        self._engine = self._placement = None
        self._model = None
        gc.collect()
        if self._device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()


def measure_profile(session: ModelSession, progress: bool = True) -> LayerProfile:
    """Block Influence of every layer (and angular distances for the angular criterion) on the calibration set."""
    config = session.config
    return profile_model(
        session.engine(),
        session.calib(),
        batch_size=config.profile.batch_size,
        model_sha256=session.source.sha256,
        angular=config.selection.criterion == "angular",
        progress=progress,
    )


def cached_profile(
    config: Config, source: ModelSource, key: dict[str, Any], compute: Callable[[], LayerProfile]
) -> tuple[LayerProfile, bool]:
    """The profile for ``key`` from the cache, or ``compute()``d once (another launcher computing it is awaited)."""

    def describe(d: Any) -> str:
        # A file or folder is named by its last part; the bundled text by its own description.
        text = Path(config.calibration.path).name if config.calibration.path else d["calibration_source"]
        return f"{source.name}: BI of {len(d['bi'])} layers on {d['num_tokens']} tokens of {text}"

    cache_dir = config.resolved_cache_dir()
    data, reused = cache.cached_json(cache_dir, "profiles", key, lambda: dataclasses.asdict(compute()), describe)
    if reused:
        log.info("Profile reused from the cache (profiles/%s)", cache.entry_name("profiles", key))
    return LayerProfile(**data), reused


def run_profile(config: Config, source: ModelSource, docs: Documents) -> LayerProfile:
    """Every layer's Block Influence on the calibration documents: from the cache, or measured and cached."""
    from shortgpt_serve.keys import profile_key

    key = profile_key(config, source, docs, cache.FileHashes(config.resolved_cache_dir()))
    session = ModelSession(config, source, docs)
    try:
        return cached_profile(config, source, key, lambda: measure_profile(session))[0]
    finally:
        session.close()
