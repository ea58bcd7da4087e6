"""Chain the stages: model -> calibration -> profile -> selection (latency budget + accuracy floor) -> checkpoint.

Library callers and the CLI share this; serving is a separate step on the folder it returns.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import logging
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shortgpt_serve import cache
from shortgpt_serve.calibration import CalibrationSet, Documents, load_documents, pack
from shortgpt_serve.checkpoint import PROVENANCE_NAME, side_files, write_checkpoint
from shortgpt_serve.config import Config
from shortgpt_serve.errors import CheckpointError, ConfigError, QualityError
from shortgpt_serve.models import ModelSource, load_model, load_tokenizer, resolve_device, resolve_dtype, resolve_model
from shortgpt_serve.profile import LayerProfile, angular_distances, profile_model
from shortgpt_serve.selection import (
    Candidate,
    CostModel,
    Evaluator,
    Selection,
    plan_angular,
    plan_bi,
    plan_from_order,
    removable,
    select_depth,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prepared:
    source: ModelSource
    profile: LayerProfile
    selection: Selection
    checkpoint: Path
    served_model_name: str
    provenance: dict[str, Any]
    reused: bool
    summary: str
    """The short printed form of the report."""


def served_name(config: Config, source: ModelSource) -> str:
    return config.serve.served_model_name or f"{source.name}-short"


def resolve_source(config: Config, hashes: cache.FileHashes | None = None) -> ModelSource:
    """``--model`` as a local safetensors folder, under the config's pickle and remote-code permissions."""
    return resolve_model(
        config.model,
        config.resolved_cache_dir(),
        allow_pickle_weights=config.allow_pickle_weights,
        trust_remote_code=config.trust_remote_code,
        hashes=hashes,
    )


def check_paths(config: Config) -> None:
    """Settings that name paths, checked against the filesystem before any model work; nothing is written."""
    cache = config.resolved_cache_dir()
    if cache.exists() and not cache.is_dir():
        raise ConfigError(
            f"--cache-dir {cache} is a file; pass a folder (it is created if missing).", param="--cache-dir"
        )
    if config.output is None:
        return
    out = Path(config.output).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise ConfigError(
            f"--output {config.output} is a file; pass a folder path for the checkpoint.", param="--output"
        )
    model = Path(config.model).expanduser() if config.model else None
    if model is not None and model.exists():
        model = model.resolve()
        if out.is_relative_to(model):
            where = "is the model folder" if out == model else "is inside the model folder"
            raise ConfigError(
                f"--output {config.output} {where} {model}; write the checkpoint elsewhere.", param="--output"
            )
        if model.is_relative_to(out):
            raise ConfigError(
                f"--output {config.output} holds the model {model}; choose a folder outside it.", param="--output"
            )
    if out.is_dir() and config.overwrite and any(out.iterdir()) and not (out / PROVENANCE_NAME).is_file():
        raise ConfigError(
            f"--overwrite replaces only a checkpoint written by shortgpt-serve, and {config.output} is not one "
            f"(no {PROVENANCE_NAME}); choose another --output.",
            param="--overwrite",
        )


def read_calibration(config: Config) -> Documents:
    cal = config.calibration
    return load_documents(cal.path, cal.heldout_fraction, cal.seed)


def calibration_set(config: Config, source: ModelSource, docs: Documents) -> CalibrationSet:
    cal = config.calibration
    calib = pack(docs, load_tokenizer(source), cal.num_tokens, cal.seq_len)
    log.info(
        "Calibration: %d sequences, %d tokens of %s (%d documents held out)",
        len(calib.sequences),
        calib.num_tokens,
        calib.source,
        len(docs.heldout),
    )
    return calib


def run_profile(config: Config, source: ModelSource, docs: Documents, progress: bool = True) -> LayerProfile:
    """Every layer's Block Influence on the calibration documents: from the cache, or measured and cached."""
    key = profile_key(config, source, docs, cache.FileHashes(config.resolved_cache_dir()))
    loaded = Loaded(config, source, docs)
    try:
        return cached_profile(
            config, source, key, lambda: _profile(config, source, loaded.model(), loaded.calib(), progress)
        )[0]
    finally:
        loaded.close()


class Loaded:
    """The calibration set and the model, built when first needed: a cached profile needs neither."""

    def __init__(self, config: Config, source: ModelSource, docs: Documents) -> None:
        self.config, self.source, self.docs = config, source, docs
        self._calib: CalibrationSet | None = None
        self._model: PreTrainedModel | None = None

    def calib(self) -> CalibrationSet:
        if self._calib is None:
            self._calib = calibration_set(self.config, self.source, self.docs)
        return self._calib

    def model(self) -> PreTrainedModel:
        if self._model is None:
            self.calib()  # fails on unusable text before the model is loaded
            log.info("Loading %s", self.source.origin)
            self._model = load_model(self.source, self.config.profile.device, self.config.profile.dtype)
        return self._model

    def close(self) -> None:
        self._model = None
        gc.collect()


def _profile(
    config: Config, source: ModelSource, model: PreTrainedModel, calib: CalibrationSet, progress: bool
) -> LayerProfile:
    from shortgpt_serve.calibration import batches

    bs = config.profile.batch_size
    profile = profile_model(model, source.family, calib, batch_size=bs, model_sha256=source.sha256, progress=progress)
    if config.selection.criterion == "angular":
        device = str(next(model.parameters()).device)
        pad = int(getattr(model.config, "pad_token_id", None) or 0)
        dist = angular_distances(
            model,
            source.family,
            batches(calib.sequences, bs, pad, device),
            progress=progress,
            total_batches=-(-len(calib.sequences) // bs),
        )
        profile = dataclasses.replace(profile, angular=dist)
    return profile


def iterative_bi_order(
    model: PreTrainedModel,
    source: ModelSource,
    calib: CalibrationSet,
    first_bi: list[float],
    config: Config,
    stop: Callable[[list[int]], bool],
    progress: bool,
) -> list[int]:
    """Remove the lowest-BI layer, re-profile the shortened model, repeat until ``stop(order)``."""
    from shortgpt_serve.calibration import batches
    from shortgpt_serve.profile import profile_layers
    from shortgpt_serve.layers import skipped_layers

    sel = config.selection
    allowed = set(removable(source.num_layers, sel.keep_first, sel.keep_last))
    order: list[int] = []
    bi = first_bi
    pad = int(getattr(model.config, "pad_token_id", None) or 0)
    device = str(next(model.parameters()).device)
    while allowed - set(order) and not stop(order):
        pick = min(allowed - set(order), key=lambda i: (bi[i], i))
        order.append(pick)
        if stop(order) or not allowed - set(order):
            break
        kept = [i for i in range(source.num_layers) if i not in set(order)]
        log.info("iterative-bi: removed %s; re-profiling %d layers", sorted(order), len(kept))
        with skipped_layers(model, source.family, order):
            short_bi, _ = profile_layers(
                model,
                source.family,
                batches(calib.sequences, config.profile.batch_size, pad, device),
                progress=progress,
            )
        bi = [float("inf")] * source.num_layers
        for new_idx, old_idx in enumerate(kept):
            bi[old_idx] = short_bi[new_idx]
    return order


# --- cache keys: each stage's result is keyed by what determines it -----------------------------------------------


def model_key(source: ModelSource, hashes: cache.FileHashes) -> dict[str, Any]:
    """The model as results depend on it: config and weights (``source.sha256``) and the files copied beside them
    (tokenizer, chat template, generation config), whose content changes calibration tokens and scores."""
    return {"sha256": source.sha256, "files": {f.name: hashes.sha256(f) for f in side_files(source.path)}}


def _device_and_dtype(config: Config, dtype: str) -> tuple[str, str]:
    device = resolve_device(config.profile.device)
    return device.split(":")[0], resolve_dtype(dtype, device)


def profile_key(config: Config, source: ModelSource, docs: Documents, hashes: cache.FileHashes) -> dict[str, Any]:
    """What a BI profile depends on (not the batch size: it changes only the order of float sums)."""
    cal = config.calibration
    device, dtype = _device_and_dtype(config, config.profile.dtype)
    return {
        "model": model_key(source, hashes),
        "calibration": {
            "source": docs.source,
            "documents_sha256": docs.sha256,
            "num_tokens": cal.num_tokens,
            "seq_len": cal.seq_len,
        },
        "device": device,
        "dtype": dtype,
        "angular": config.selection.criterion == "angular",
    }


def quality_key(config: Config, source: ModelSource, heldout: list[str], hashes: cache.FileHashes) -> dict[str, Any]:
    """What the full model's scores depend on: the model, the task sample, the dtype and the held-out text."""
    q = config.quality
    device, dtype = _device_and_dtype(config, q.dtype)
    return {
        "model": model_key(source, hashes),
        "tasks": list(q.tasks),
        "limit": q.limit,
        "seed": q.seed,
        "device": device,
        "dtype": dtype,
        "perplexity": {
            "tokens": q.perplexity_tokens,
            "heldout_sha256": hashlib.sha256("\0".join(heldout).encode()).hexdigest(),
            "seq_len": config.calibration.seq_len,
        },
    }


def checkpoint_key(config: Config, profile: dict[str, Any], quality: dict[str, Any] | None) -> dict[str, Any]:
    """What the chosen depth and the written checkpoint depend on: the profile's inputs, every selection setting
    (criterion, latency budget, accuracy floor, strictness, kept ends, cost context) and the quality settings."""
    return {"profile": profile, "selection": dataclasses.asdict(config.selection), "quality": quality}


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


# --- quality ---------------------------------------------------------------------------------------------------


def check_quality_inputs(config: Config) -> None:
    """Fail before any model work on an unknown task or missing evaluation data."""
    from shortgpt_serve.quality import load_items

    if config.quality.enabled:
        for task in config.quality.tasks:
            load_items(task, config.quality.limit, config.quality.seed)


def _quality_record(scores: dict[str, Any], retained: Any, perplexity: float | None) -> dict[str, Any]:
    from shortgpt_serve.quality import TASKS

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
    record: dict[str, Any] = {"tasks": tasks, "perplexity": perplexity}
    if retained is not None:
        record.update(
            retained=retained.retained,
            retained_se=retained.standard_error,
            raw_ratio=retained.raw_ratio,
            no_signal=list(retained.no_signal),
        )
    return record


class QualityMeter:
    """Scores the full model once (cached on disk) and candidates by skipping layers in the loaded model."""

    def __init__(
        self,
        config: Config,
        source: ModelSource,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        heldout: list[str],
        key: dict[str, Any] | None = None,
    ) -> None:
        """``key``: the full model's scores' cache key (default: ``quality_key`` of these settings)."""
        from shortgpt_serve.quality import load_items

        q = config.quality
        self.config, self.source, self.model, self.tokenizer = config, source, model, tokenizer
        self.items = [item for task in q.tasks for item in load_items(task, q.limit, q.seed)]
        self.heldout = heldout
        if q.perplexity_tokens and not heldout:
            log.warning("No held-out documents (calibration.heldout_fraction or too little text): perplexity skipped")
        self.evaluations = 0
        self.full_scores: dict[str, Any] = {}
        self.full: dict[str, Any] = {}
        self.key = key or quality_key(config, source, heldout, cache.FileHashes(config.resolved_cache_dir()))

    def _measure(self) -> tuple[dict[str, Any], float | None]:
        from shortgpt_serve.quality import perplexity, score_items

        q = self.config.quality
        scores = score_items(self.model, self.tokenizer, self.items, batch_size=q.batch_size, progress=True)
        ppl = None
        if q.perplexity_tokens and self.heldout:
            ppl = perplexity(
                self.model,
                self.tokenizer,
                self.heldout,
                max_tokens=q.perplexity_tokens,
                seq_len=self.config.calibration.seq_len,
                batch_size=self.config.profile.batch_size,
            )
        return scores, ppl

    def measure_full(self) -> dict[str, Any]:
        """The full model's scores, from the cache when the same model, data and settings were measured before."""
        from shortgpt_serve.quality import TaskScore

        def measure() -> dict[str, Any]:
            log.info("Scoring the full model on %s", ", ".join(self.config.quality.tasks))
            scores, ppl = self._measure()
            return {"scores": {t: dataclasses.asdict(s) for t, s in scores.items()}, "perplexity": ppl}

        def describe(d: Any) -> str:
            tasks = ", ".join(f"{t} {s['acc']:.3f}" for t, s in d["scores"].items())
            return f"{self.source.name}: full-model scores (acc) {tasks}"

        cache_dir = self.config.resolved_cache_dir()
        data, reused = cache.cached_json(cache_dir, "quality", self.key, measure, describe)
        if reused:
            log.info("Full-model scores reused from the cache (quality/%s)", cache.entry_name("quality", self.key))
        self.full_scores = {t: TaskScore(**s) for t, s in data["scores"].items()}
        self.full = _quality_record(self.full_scores, None, data["perplexity"])
        return self.full

    def full_record(self) -> dict[str, Any]:
        from shortgpt_serve.quality import quality_retained

        r = quality_retained(self.full_scores, self.full_scores)
        return {**self.full, "retained": 1.0, "raw_ratio": 1.0, "no_signal": list(r.no_signal)}

    def __call__(self, removed: list[int]) -> dict[str, Any]:
        from shortgpt_serve.layers import skipped_layers
        from shortgpt_serve.quality import quality_retained

        log.info("Scoring %d layers removed: %s", len(removed), removed)
        with skipped_layers(self.model, self.source.family, removed):
            scores, ppl = self._measure()
        self.evaluations += 1
        retained = quality_retained(self.full_scores, scores)
        record = _quality_record(scores, retained, ppl)
        log.info(
            "  quality retained %.3f ± %.3f (raw ratio %.3f), perplexity %s",
            retained.retained,
            retained.standard_error,
            retained.raw_ratio,
            f"{ppl:.2f}" if ppl else "not measured",
        )
        return record


# --- the whole chain -------------------------------------------------------------------------------------------


def prepare(config: Config, progress: bool = True, in_use: ExitStack | None = None) -> Prepared:
    """Profile, choose the depth (latency budget and accuracy floor) and write (or reuse) the checkpoint.

    Without ``--output`` the checkpoint is a cache entry keyed by every input: a verified one is reused without
    loading the model, and concurrent launchers compute it once. ``in_use``: the entry is marked in use (so
    ``cache clear`` leaves it alone) until this stack closes.
    """
    check_paths(config)
    if config.output and Path(config.output).expanduser().exists() and not config.overwrite:
        raise CheckpointError(
            f"output folder {config.output} already exists; pass --overwrite or choose another --output."
        )
    check_quality_inputs(config)
    docs = read_calibration(config)  # cheap, and fails before any model work if the text is unusable
    cache_dir = config.resolved_cache_dir()
    hashes = cache.FileHashes(cache_dir, deferred=True)
    source = resolve_source(config, hashes)
    loaded = Loaded(config, source, docs)
    loaded.calib()  # fails on text too short for one sequence before anything is written
    pkey = profile_key(config, source, docs, hashes)
    qkey = quality_key(config, source, docs.heldout, hashes) if config.quality.enabled else None
    hashes.save()
    if config.output:
        return _build(config, source, loaded, pkey, qkey, Path(config.output).expanduser(), None, progress)
    ckey = checkpoint_key(config, pkey, qkey)
    name = cache.entry_name("checkpoints", ckey, label=source.name)
    output = cache_dir / "checkpoints" / name
    want = cache.digest(cache.full_key("checkpoints", ckey))
    with cache.lock(cache_dir, "checkpoints", name):
        if cache.usable(cache_dir, "checkpoints", name, want, hashes.sha256):
            prepared = _reused(config, source, output)
        else:
            prepared = _build(config, source, loaded, pkey, qkey, output, ckey, progress)
        if in_use is not None:
            in_use.enter_context(cache.in_use(cache_dir, "checkpoints", name))
    return prepared


def _reused(config: Config, source: ModelSource, output: Path) -> Prepared:
    """A verified cached checkpoint, with the profile and the selection that chose it (kept in its manifest)."""
    stored = cache.manifest_data(output)
    sel = stored["selection"]
    selection = Selection(**{**sel, "candidates": [Candidate(**c) for c in sel["candidates"]]})
    profile = LayerProfile(**stored["profile"])
    provenance = json.loads((output / PROVENANCE_NAME).read_text())
    log.info("Reusing the verified checkpoint %s", output)
    return Prepared(
        source, profile, selection, output, served_name(config, source), provenance, True, stored["summary"]
    )


def describe_checkpoint(source: ModelSource, selection: Selection) -> str:
    kept = selection.num_layers - len(selection.removed)
    text = f"{source.name}: {kept} of {selection.num_layers} layers, removed {selection.removed}"
    text += f"; {selection.criterion}, budget {selection.budget}"
    return text + (f", floor {selection.min_quality}" if selection.quality_met is not None else ", no quality floor")


def _build(
    config: Config,
    source: ModelSource,
    loaded: Loaded,
    pkey: dict[str, Any],
    qkey: dict[str, Any] | None,
    output: Path,
    ckey: dict[str, Any] | None,
    progress: bool,
) -> Prepared:
    """Profile (or reuse the cached profile), search the depth and write the checkpoint to ``output``;
    ``ckey``: the checkpoint's cache key when ``output`` is its cache entry."""
    from shortgpt_serve.report import build_json, describe_candidates, report_files, short_summary

    timings: dict[str, float] = {}
    docs = loaded.docs
    try:
        t0 = time.perf_counter()
        profile, profile_reused = cached_profile(
            config, source, pkey, lambda: _profile(config, source, loaded.model(), loaded.calib(), progress)
        )
        if not profile_reused:
            timings["profile"] = time.perf_counter() - t0
        sel = config.selection
        cost = CostModel.from_checkpoint(
            source.path, source.config, source.family.layers_module, sel.cost_context_tokens
        )
        t0 = time.perf_counter()
        if sel.criterion == "angular":
            assert profile.angular is not None
            plan = plan_angular(profile.angular, sel.keep_first, sel.keep_last)
        elif sel.criterion == "iterative-bi":
            order = iterative_bi_order(
                loaded.model(),
                source,
                loaded.calib(),
                profile.bi,
                config,
                lambda o: cost.cost_ratio(o) <= sel.budget,
                progress,
            )
            plan = plan_from_order(order)
            timings["iterative profiling"] = time.perf_counter() - t0
        else:
            plan = plan_bi(profile.bi, sel.keep_first, sel.keep_last)
        meter: QualityMeter | None = None
        full = None
        evaluate: Evaluator | None = None
        if config.quality.enabled:
            t0 = time.perf_counter()
            import torch

            model = loaded.model()
            device = str(next(model.parameters()).device)
            model.to(getattr(torch, resolve_dtype(config.quality.dtype, device)))
            meter = QualityMeter(config, source, model, load_tokenizer(source), docs.heldout, key=qkey)
            meter.measure_full()
            full = meter.full_record()
            timings["full-model scores"] = time.perf_counter() - t0
            if len(full["no_signal"]) == len(config.quality.tasks):
                raise QualityError(
                    f"the full model is at chance on every task ({', '.join(config.quality.tasks)}): no quality "
                    "signal to hold a floor with; choose other --tasks or pass --no-quality."
                )
            evaluate = meter
        t0 = time.perf_counter()
        tasks = list(config.quality.tasks)
        selection = select_depth(
            plan,
            cost,
            sel.budget,
            criterion=sel.criterion,
            evaluate=evaluate,
            min_quality=sel.min_quality,
            strict=sel.strict,
            describe=lambda rows: describe_candidates(rows, full, tasks),
        )
        if meter is not None:
            timings["search"] = time.perf_counter() - t0
    finally:
        loaded.close()
    name = served_name(config, source)
    src_info = {"name": source.name, "origin": source.origin, "sha256": source.sha256, "num_layers": source.num_layers}
    settings = {k: v for k, v in config.to_dict().items() if k != "serve"}
    report = build_json(
        source=src_info, profile=profile, selection=selection, full=full, settings=settings, timings=timings
    )
    summary = short_summary(selection, full, tasks if full else [])
    record = {
        "served_model_name": name,
        "block_influence": profile.bi,
        "calibration": {
            "source": profile.calibration_source,
            "sha256": profile.calibration_sha256,
            "num_tokens": profile.num_tokens,
            "num_sequences": profile.num_sequences,
            "seq_len": profile.seq_len,
            "heldout_fraction": config.calibration.heldout_fraction,
            "seed": config.calibration.seed,
        },
        "selection": {
            "criterion": selection.criterion,
            "budget": selection.budget,
            "cost_ratio": selection.cost_ratio,
            "cost_context_tokens": sel.cost_context_tokens,
            "params_full": selection.params_full,
            "params_short": selection.params_short,
            "min_quality": selection.min_quality,
            "latency_met": selection.latency_met,
            "quality_met": selection.quality_met,
            "reason": selection.reason,
        },
        "quality": {"full": full, "shortened": selection.quality} if full else None,
    }
    seal = None
    if ckey is not None:
        stored = {"profile": dataclasses.asdict(profile), "selection": selection.to_dict(), "summary": summary}
        text = describe_checkpoint(source, selection)

        def seal(folder: Path) -> None:
            cache.write_manifest(folder, "checkpoints", ckey, text, data=stored)

    log.info("Writing the shortened checkpoint to %s", output)
    try:
        write_checkpoint(
            source,
            selection.removed,
            output,
            provenance=record,
            extra_files=report_files(report, tasks if full else [], profile, selection),
            overwrite=config.overwrite or ckey is not None,
            seal=seal,
        )
    except CheckpointError as exc:
        cause = exc.__cause__
        if ckey is not None and isinstance(cause, OSError) and cause.errno in cache.WRITE_ERRNOS:
            raise cache.write_error(config.resolved_cache_dir(), cause) from exc
        raise
    provenance = json.loads((output / PROVENANCE_NAME).read_text())
    return Prepared(source, profile, selection, output, name, provenance, False, summary)
