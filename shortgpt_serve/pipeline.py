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
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shortgpt_serve import __version__
from shortgpt_serve.calibration import CalibrationSet, Documents, load_documents, pack
from shortgpt_serve.checkpoint import PROVENANCE_NAME, verify_checkpoint, write_checkpoint
from shortgpt_serve.config import Config
from shortgpt_serve.errors import CheckpointError, ConfigError, QualityError
from shortgpt_serve.fsutil import atomic_write_text
from shortgpt_serve.models import ModelSource, load_model, load_tokenizer, resolve_dtype, resolve_model
from shortgpt_serve.profile import LayerProfile, angular_distances, profile_model
from shortgpt_serve.selection import (
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


def resolve_source(config: Config) -> ModelSource:
    """``--model`` as a local safetensors folder, under the config's pickle and remote-code permissions."""
    return resolve_model(
        config.model,
        config.resolved_cache_dir(),
        allow_pickle_weights=config.allow_pickle_weights,
        trust_remote_code=config.trust_remote_code,
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
    """Load the model and measure every layer's Block Influence on the calibration documents."""
    calib = calibration_set(config, source, docs)
    log.info("Loading %s for profiling", source.origin)
    model = load_model(source, config.profile.device, config.profile.dtype)
    try:
        return _profile(config, source, model, calib, progress)
    finally:
        del model
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
    from shortgpt_serve.quality import skipped_layers

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
    ) -> None:
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

    def _cache_key(self) -> str:
        q = self.config.quality
        held = hashlib.sha256("\0".join(self.heldout).encode()).hexdigest()
        payload = [self.source.sha256, list(q.tasks), q.limit, q.seed, q.dtype, q.perplexity_tokens, held, __version__]
        return hashlib.sha256(json.dumps(payload).encode()).hexdigest()[:16]

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

        path = self.config.resolved_cache_dir() / "quality" / f"full-{self._cache_key()}.json"
        if path.is_file():
            try:
                data = json.loads(path.read_text())
                self.full_scores = {t: TaskScore(**s) for t, s in data["scores"].items()}
                self.full = _quality_record(self.full_scores, None, data["perplexity"])
                log.info("Full-model scores reused from %s", path)
                return self.full
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                log.warning("Ignoring unreadable cached scores %s (%s)", path, exc)
        log.info("Scoring the full model on %s", ", ".join(self.config.quality.tasks))
        scores, ppl = self._measure()
        self.full_scores = scores
        self.full = _quality_record(scores, None, ppl)
        payload = {"scores": {t: dataclasses.asdict(s) for t, s in scores.items()}, "perplexity": ppl}
        atomic_write_text(path, json.dumps(payload, indent=2) + "\n")
        return self.full

    def full_record(self) -> dict[str, Any]:
        from shortgpt_serve.quality import quality_retained

        r = quality_retained(self.full_scores, self.full_scores)
        return {**self.full, "retained": 1.0, "raw_ratio": 1.0, "no_signal": list(r.no_signal)}

    def __call__(self, removed: list[int]) -> dict[str, Any]:
        from shortgpt_serve.quality import quality_retained, skipped_layers

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


def default_output(config: Config, source: ModelSource, profile: LayerProfile, selection: Selection) -> Path:
    key = hashlib.sha256(
        json.dumps(
            [
                source.sha256,
                selection.removed,
                profile.calibration_sha256,
                profile.num_tokens,
                selection.budget,
                selection.min_quality,
                selection.criterion,
                dataclasses.asdict(config.quality) if config.quality.enabled else None,
                __version__,
            ]
        ).encode()
    ).hexdigest()[:12]
    n_kept = selection.num_layers - len(selection.removed)
    return config.resolved_cache_dir() / "checkpoints" / f"{source.name}-{n_kept}of{selection.num_layers}-{key}"


def prepare(config: Config, progress: bool = True) -> Prepared:
    """Profile, choose the depth (latency budget and accuracy floor) and write (or reuse) the checkpoint."""
    from shortgpt_serve.report import build_json, describe_candidates, report_files, short_summary

    check_paths(config)
    if config.output and Path(config.output).expanduser().exists() and not config.overwrite:
        raise CheckpointError(
            f"output folder {config.output} already exists; pass --overwrite or choose another --output."
        )
    check_quality_inputs(config)
    docs = read_calibration(config)  # cheap, and fails before any model work if the text is unusable
    source = resolve_source(config)
    timings: dict[str, float] = {}
    calib = calibration_set(config, source, docs)
    log.info("Loading %s", source.origin)
    model = load_model(source, config.profile.device, config.profile.dtype)
    try:
        t0 = time.perf_counter()
        profile = _profile(config, source, model, calib, progress)
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
                model, source, calib, profile.bi, config, lambda o: cost.cost_ratio(o) <= sel.budget, progress
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

            device = str(next(model.parameters()).device)
            model.to(getattr(torch, resolve_dtype(config.quality.dtype, device)))
            meter = QualityMeter(config, source, model, load_tokenizer(source), docs.heldout)
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
        del model
        gc.collect()
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
    output = Path(config.output).expanduser() if config.output else default_output(config, source, profile, selection)
    reused = False
    if config.output is None and (output / PROVENANCE_NAME).is_file():
        try:
            verify_checkpoint(output)
            reused = True
            log.info("Reusing the verified checkpoint %s", output)
        except CheckpointError as exc:
            log.warning("Rewriting %s: %s", output, exc)
    if not reused:
        log.info("Writing the shortened checkpoint to %s", output)
        write_checkpoint(
            source,
            selection.removed,
            output,
            provenance=record,
            extra_files=report_files(report, tasks if full else [], profile, selection),
            overwrite=config.overwrite or config.output is None,
        )
    provenance = json.loads((output / PROVENANCE_NAME).read_text())
    return Prepared(source, profile, selection, output, name, provenance, reused, summary)
