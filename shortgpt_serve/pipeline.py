"""Chain the stages: inputs -> calibration -> profile -> plan -> quality + healing + selection -> checkpoint.

Library callers and the CLI share this; serving is a separate step on the folder it returns
(:func:`shortgpt_serve.serving.launch.launch`). Each stage lives in its own module; this one only calls them in order,
behind the cache.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shortgpt_serve import cache
from shortgpt_serve.checkpoint import PROVENANCE_NAME, write_checkpoint
from shortgpt_serve.config import Config
from shortgpt_serve.errors import CheckpointError, QualityError
from shortgpt_serve.fsutil import check_output_free
from shortgpt_serve.healing.adapters import MergedTensors
from shortgpt_serve.healing.evaluate import Healer, check_healing, distill_choice
from shortgpt_serve.healing.tensors import folded_tensors, layer_tensors
from shortgpt_serve.inputs import check_paths, check_quality_inputs, read_calibration, resolve_source, served_name
from shortgpt_serve.keys import checkpoint_key, profile_key, quality_key
from shortgpt_serve.models.loading import load_tokenizer
from shortgpt_serve.models.rope import context_record
from shortgpt_serve.models.source import ModelSource
from shortgpt_serve.profile import LayerProfile, iterative_bi_order
from shortgpt_serve.provenance import Provenance, build_provenance
from shortgpt_serve.quality.meter import QualityMeter
from shortgpt_serve.selection import (
    Candidate,
    CostModel,
    Selection,
    candidates,
    plan_angular,
    plan_bi,
    plan_from_order,
    removable,
    select_depth,
)
from shortgpt_serve.session import ModelSession, cached_profile, measure_profile

log = logging.getLogger(__name__)

RESUME_POINTS = 4
"""Layer boundaries at most where the full model's states are kept for the depth search (memory: one set of
states of every scoring batch each)."""


@dataclass(frozen=True)
class Prepared:
    source: ModelSource
    profile: LayerProfile
    selection: Selection
    checkpoint: Path
    served_model_name: str
    provenance: Provenance
    reused: bool
    summary: str
    """The short printed form of the report."""


def prepare(config: Config, progress: bool = True, in_use: ExitStack | None = None) -> Prepared:
    """Profile, choose the depth (latency budget and accuracy floor) and write (or reuse) the checkpoint.

    Without ``--output`` the checkpoint is a cache entry keyed by every input: a verified one is reused without
    loading the model, and concurrent launchers compute it once. ``in_use``: the entry is marked in use (so
    ``cache clear`` leaves it alone) until this stack closes.
    """
    check_paths(config)
    if config.output:
        check_output_free(config.output, overwrite=config.overwrite)
    check_quality_inputs(config)
    docs = read_calibration(config)  # cheap, and fails before any model work if the text is unusable
    cache_dir = config.resolved_cache_dir()
    hashes = cache.FileHashes(cache_dir, deferred=True)
    source = resolve_source(config, hashes)
    session = ModelSession(config, source, docs)
    # Fails on text too short for one sequence, or for healing, before anything is written.
    check_healing(config, source, session.calib().num_tokens)
    session.memory_plan()  # a model that cannot fit even streamed is refused here, before any long work
    pkey = profile_key(config, source, docs, hashes)
    qkey = quality_key(config, source, docs.heldout, hashes) if config.quality.enabled else None
    hashes.save()
    if config.output:
        return _build(config, source, session, pkey, qkey, Path(config.output).expanduser(), None, progress, hashes)
    ckey = checkpoint_key(config, pkey, qkey)
    name = cache.entry_name("checkpoints", ckey, label=source.name)
    output = cache_dir / "checkpoints" / name
    want = cache.digest(cache.full_key("checkpoints", ckey))
    with cache.lock(cache_dir, "checkpoints", name):
        if cache.usable(cache_dir, "checkpoints", name, want, hashes.sha256):
            prepared = _reused(config, source, output)
        else:
            prepared = _build(config, source, session, pkey, qkey, output, ckey, progress, hashes)
        if in_use is not None:
            in_use.enter_context(cache.in_use(cache_dir, "checkpoints", name))
    return prepared


def _reused(config: Config, source: ModelSource, output: Path) -> Prepared:
    """A verified cached checkpoint, with the profile and the selection that chose it (kept in its manifest)."""
    stored = cache.manifest_data(output)
    sel = stored["selection"]
    selection = Selection(**{**sel, "candidates": [Candidate(**c) for c in sel["candidates"]]})
    profile = LayerProfile(**stored["profile"])
    provenance = Provenance.from_json(json.loads((output / PROVENANCE_NAME).read_text()))
    log.info("Reusing the verified checkpoint %s", output)
    return Prepared(
        source, profile, selection, output, served_name(config, source), provenance, True, stored["summary"]
    )


def describe_checkpoint(source: ModelSource, selection: Selection) -> str:
    kept = selection.num_layers - len(selection.removed)
    text = f"{source.name}: {kept} of {selection.num_layers} layers, removed {selection.removed}"
    text += f"; {selection.criterion}, budget {selection.budget}"
    return text + (f", floor {selection.min_quality}" if selection.quality_met is not None else ", no quality floor")


def plan_removals(
    config: Config, session: ModelSession, profile: LayerProfile, cost: CostModel
) -> tuple[list[list[int]], dict[str, float]]:
    """For each depth n, the layers the criterion removes; and the time iterative profiling took."""
    sel = config.selection
    if sel.criterion == "angular":
        assert profile.angular is not None
        return plan_angular(profile.angular, sel.keep_first, sel.keep_last), {}
    if sel.criterion == "iterative-bi":
        t0 = time.perf_counter()
        order = iterative_bi_order(
            session.engine(),
            session.calibration_batches(),
            profile.bi,
            removable(session.source.num_layers, sel.keep_first, sel.keep_last),
            lambda o: cost.cost_ratio(o) <= sel.budget,
        )
        return plan_from_order(order), {"iterative profiling": time.perf_counter() - t0}
    return plan_bi(profile.bi, sel.keep_first, sel.keep_last), {}


def full_quality(
    config: Config,
    session: ModelSession,
    key: dict[str, Any] | None,
    plan: list[list[int]],
    cost: CostModel,
    progress: bool = True,
) -> QualityMeter:
    """The quality meter, with the full model's scores measured (or reused from the cache).

    The depth search first asks for the shallowest plan that meets the latency budget; when the full model has
    to be scored, that candidate is scored in the same pass.
    """
    assert key is not None
    source = session.source
    engine = session.engine(config.quality.dtype)
    meter = QualityMeter(
        config, source, engine, load_tokenizer(source), session.docs.heldout, key=key, exclude=session.docs.calibration
    )
    meter.progress = progress
    rows = candidates(plan, cost, config.selection.budget)
    n_budget = next((c.n_removed for c in rows if c.meets_budget), 0)
    # The search asks only for depths below the budget's; each starts at the deepest kept boundary before its
    # first removed layer (a few boundaries: each holds every batch's states).
    firsts = sorted({min(plan[n]) for n in range(1, n_budget) if plan[n]})
    meter.resume_at = set(firsts[-RESUME_POINTS:])
    first = rows[n_budget].removed if rows[n_budget].meets_budget else []
    meter.measure_full(ahead=[first])
    if len(meter.full_record()["no_signal"]) == len(config.quality.tasks):
        raise QualityError(
            f"the full model is at chance on every task ({', '.join(config.quality.tasks)}): no quality "
            "signal to hold a floor with; choose other --tasks or pass --no-quality."
        )
    return meter


def _build(
    config: Config,
    source: ModelSource,
    session: ModelSession,
    pkey: dict[str, Any],
    qkey: dict[str, Any] | None,
    output: Path,
    ckey: dict[str, Any] | None,
    progress: bool,
    hashes: cache.FileHashes,
) -> Prepared:
    """Profile (or reuse the cached profile), search the depth and write the checkpoint to ``output``;
    ``ckey``: the checkpoint's cache key when ``output`` is its cache entry; ``hashes``: the memo that hashed the
    source (shards written unchanged are not hashed again)."""
    from shortgpt_serve.report import build_json, describe_candidates, report_files, short_summary

    timings: dict[str, float] = {}
    sel = config.selection
    tasks = list(config.quality.tasks)
    context = context_record(source.config)
    log.info("%s", context["summary"])
    try:
        t0 = time.perf_counter()
        profile, profile_reused = cached_profile(config, source, pkey, lambda: measure_profile(session, progress))
        if not profile_reused:
            timings["profile"] = time.perf_counter() - t0
        cost = CostModel.from_checkpoint(
            source.path, source.config, source.family.layers_module, sel.cost_context_tokens
        )
        plan, more = plan_removals(config, session, profile, cost)
        timings.update(more)
        meter = full = None
        if config.quality.enabled:
            t0 = time.perf_counter()
            meter = full_quality(config, session, qkey, plan, cost, progress)
            full = meter.full_record()
            timings["full-model scores"] = time.perf_counter() - t0
        dtype = config.quality.dtype if config.quality.enabled else None
        healer = Healer(config, lambda: session.engine(dtype), session.calibration_batches, meter, progress)
        t0 = time.perf_counter()
        selection = select_depth(
            plan,
            cost,
            sel.budget,
            criterion=sel.criterion,
            evaluate=(healer if healer.enabled else meter) if meter is not None else None,
            min_quality=sel.min_quality,
            strict=sel.strict,
            describe=lambda rows: describe_candidates(rows, full, tasks),
            max_kl=sel.max_kl,
            min_agreement=sel.min_agreement,
            decide=sel.decide,
            confirm=sel.confirm,
        )
        if meter is not None:
            timings["search"] = time.perf_counter() - t0
        distilled = None
        if config.heal.method == "distill":
            t0 = time.perf_counter()
            selection, distilled = distill_choice(healer, selection, plan)
            timings["distillation"] = time.perf_counter() - t0
        healing = healer.fit(selection.removed)  # already fitted when the search measured it
        if healer.fitted:
            timings["linear healing (all candidates)"] = sum(h.seconds for h in healer.fitted.values())
    finally:
        session.close()
    overrides: Mapping[str, bytes] | None = None
    heal_record = None if healing is None else healing.record()
    if distilled is not None and distilled.adapters is not None:
        folded = folded_tensors(source.path, source.family.layers_module, healing.maps) if healing else None
        overrides = MergedTensors(source.path, source.family.layers_module, distilled.adapters, folded)
        heal_record = {**distilled.record(), "linear_start": heal_record}
    elif distilled is not None:
        overrides = layer_tensors(source.path, source.family.layers_module, distilled.layers)
        heal_record = {**distilled.record(), "linear_start": heal_record}
    elif healing is not None and healing.maps:
        overrides = folded_tensors(source.path, source.family.layers_module, healing.maps)
    name = served_name(config, source)
    src_info = {"name": source.name, "origin": source.origin, "sha256": source.sha256, "num_layers": source.num_layers}
    settings = {k: v for k, v in config.to_dict().items() if k != "serve"}
    report = build_json(
        source=src_info,
        profile=profile,
        selection=selection,
        full=full,
        settings=settings,
        timings=timings,
        context=context,
    )
    summary = short_summary(selection, full, tasks if full else [])
    record = build_provenance(
        source,
        selection.removed,
        served_model_name=name,
        profile=profile,
        selection=selection,
        config=config,
        full=full,
        healing=heal_record,
    )
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
            overrides=overrides,
            known=hashes.known,
        )
    except CheckpointError as exc:
        cause = exc.__cause__
        if ckey is not None and isinstance(cause, OSError) and cause.errno in cache.WRITE_ERRNOS:
            raise cache.write_error(config.resolved_cache_dir(), cause) from exc
        raise
    provenance = Provenance.from_json(json.loads((output / PROVENANCE_NAME).read_text()))
    return Prepared(source, profile, selection, output, name, provenance, False, summary)
