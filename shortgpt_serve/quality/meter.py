"""The quality meter: the full model's scores (cached on disk) and candidates', a pass of the engine per call.

Every call scores the benchmark items and the held-out perplexity of the full model or of any number of
candidate removals in one pass: the requests and perplexity blocks are encoded once, and candidates share the
full model's hidden states up to the first layer they skip. The full model's states at chosen layer boundaries
are kept from one pass to the next (``resume_at``), so a later candidate starts at the deepest one before its
first removed layer instead of recomputing the layers every candidate shares.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from shortgpt_serve import cache
from shortgpt_serve.passes import Batch, Boundary, PassEngine, Route
from shortgpt_serve.quality.perplexity import NegLogLikelihood, perplexity_batches
from shortgpt_serve.quality.retained import Retained, quality_retained
from shortgpt_serve.quality.scoring import (
    LogLikelihood,
    RequestBatches,
    TaskScore,
    check_items,
    max_positions,
    task_scores,
)
from shortgpt_serve.quality.tasks import TASKS, load_items

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

    from shortgpt_serve.config import Config
    from shortgpt_serve.models.source import ModelSource

log = logging.getLogger(__name__)

Measured = tuple[dict[str, TaskScore], float | None]
"""Task scores and held-out perplexity (None when not measured)."""


def quality_record(scores: dict[str, TaskScore], retained: Retained | None, perplexity: float | None) -> dict[str, Any]:
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
    """Scores the full model once (cached on disk) and candidates by skipping layers in one pass each."""

    def __init__(
        self,
        config: Config,
        source: ModelSource,
        engine: PassEngine,
        tokenizer: PreTrainedTokenizerBase,
        heldout: list[str],
        key: dict[str, Any],
    ) -> None:
        """``key``: the full model's scores' cache key (:func:`shortgpt_serve.keys.quality_key`)."""
        q = config.quality
        self.config, self.source, self.engine, self.tokenizer = config, source, engine, tokenizer
        self.items = [item for task in q.tasks for item in load_items(task, q.limit, q.seed)]
        check_items(self.items)
        self.heldout = heldout
        if q.perplexity_tokens and not heldout:
            log.warning("No held-out documents (calibration.heldout_fraction or too little text): perplexity skipped")
        self.evaluations = 0
        self.passes = 0
        self.progress = True
        """Show a progress bar over the layers of each pass."""
        self.full_scores: dict[str, TaskScore] = {}
        self.full: dict[str, Any] = {}
        self.key = key
        self._requests: RequestBatches | None = None
        self._blocks: list[Batch] = []
        self._ahead: dict[tuple[int, ...], Measured] = {}
        """Candidates measured ahead of being asked for (in the full model's pass)."""
        self.resume_at: set[int] = set()
        """Layer boundaries where the full model's states are kept, once a pass computes them, so that a later
        candidate whose first removed layer lies at or after one starts there (set by the caller, which knows
        which candidates may come)."""
        self._boundaries: dict[int, Boundary] = {}

    def _prepare(self) -> tuple[RequestBatches, list[Batch]]:
        if self._requests is None:
            q = self.config.quality
            max_len = max_positions(self.engine.model)
            flat = [r for item in self.items for r in item.requests]
            self._requests = RequestBatches.build(self.tokenizer, flat, q.batch_size, self.engine)
            if q.perplexity_tokens and self.heldout:
                self._blocks = perplexity_batches(
                    self.tokenizer,
                    self.heldout,
                    max_tokens=q.perplexity_tokens,
                    seq_len=self.config.calibration.seq_len,
                    batch_size=self.config.profile.batch_size,
                    max_len=max_len,
                )
        return self._requests, self._blocks

    def _measure(self, removals: Sequence[Sequence[int]]) -> list[Measured]:
        """Scores and perplexity with each removal's layers skipped, in one pass of the engine."""
        requests, blocks = self._prepare()
        n_req = len(requests.batches)
        routes, outcomes = [], []
        for removed in removals:
            lls: list[LogLikelihood] = [(0.0, 0)] * len(requests.encoded)
            nll = NegLogLikelihood(blocks)
            read_ll = requests.reader(lls)

            def read(b: int, logits: torch.Tensor, read_ll: Any = read_ll, nll: NegLogLikelihood = nll) -> None:
                if b < n_req:
                    read_ll(b, logits)
                else:
                    nll(b - n_req, logits)

            routes.append(Route(frozenset(removed), on_logits=read))
            outcomes.append((lls, nll))
        what = "the full model" if list(map(list, removals)) == [[]] else f"{len(removals)} model(s)"
        # Start at the deepest kept boundary before every candidate's first removed layer.
        first = min((min(r) for r in removals if r), default=self.engine.num_layers)
        start = max((b for b in self._boundaries.values() if b.layer <= first), key=lambda b: b.layer, default=None)
        kept = self.engine.run(
            [*requests.batches, *blocks],
            routes,
            progress=f"Scoring {what}" if self.progress else None,
            keep=self.resume_at - set(self._boundaries),
            start=start,
        )
        self._boundaries.update(kept)
        self.passes += 1
        return [(task_scores(self.items, lls), nll.perplexity if blocks else None) for lls, nll in outcomes]

    def measure_full(self, ahead: Sequence[Sequence[int]] = ()) -> dict[str, Any]:
        """The full model's scores, from the cache when the same model, data and settings were measured before.

        ``ahead``: candidates that will be asked for next; when the full model has to be scored, they are scored
        in the same pass (sharing its states up to the first layer each skips) and kept for that call.
        """

        def measure() -> dict[str, Any]:
            log.info("Scoring the full model on %s", ", ".join(self.config.quality.tasks))
            extra = [list(r) for r in ahead if r]
            (scores, ppl), *more = self._measure([[], *extra])
            self._ahead.update((tuple(sorted(r)), m) for r, m in zip(extra, more, strict=True))
            return {"scores": {t: dataclasses.asdict(s) for t, s in scores.items()}, "perplexity": ppl}

        def describe(d: Any) -> str:
            tasks = ", ".join(f"{t} {s['acc']:.3f}" for t, s in d["scores"].items())
            return f"{self.source.name}: full-model scores (acc) {tasks}"

        cache_dir = self.config.resolved_cache_dir()
        data, reused = cache.cached_json(cache_dir, "quality", self.key, measure, describe)
        if reused:
            log.info("Full-model scores reused from the cache (quality/%s)", cache.entry_name("quality", self.key))
        self.full_scores = {t: TaskScore(**s) for t, s in data["scores"].items()}
        self.full = quality_record(self.full_scores, None, data["perplexity"])
        return self.full

    def full_record(self) -> dict[str, Any]:
        r = quality_retained(self.full_scores, self.full_scores)
        return {**self.full, "retained": 1.0, "raw_ratio": 1.0, "no_signal": list(r.no_signal)}

    def evaluate_many(self, removals: Sequence[Sequence[int]]) -> list[dict[str, Any]]:
        """Each candidate's quality record (as :func:`quality_record`), all scored in one pass."""
        for removed in removals:
            log.info("Scoring %d layers removed: %s", len(removed), list(removed))
        todo = [list(r) for r in removals if tuple(sorted(r)) not in self._ahead]
        measured = dict(zip((tuple(sorted(r)) for r in todo), self._measure(todo) if todo else [], strict=True))
        measured.update(self._ahead)
        records = []
        for removed in removals:
            scores, ppl = measured[tuple(sorted(removed))]
            self.evaluations += 1
            retained = quality_retained(self.full_scores, scores)
            records.append(quality_record(scores, retained, ppl))
            log.info(
                "  %d removed: quality retained %.3f ± %.3f (raw ratio %.3f), perplexity %s",
                len(removed),
                retained.retained,
                retained.standard_error,
                retained.raw_ratio,
                f"{ppl:.2f}" if ppl else "not measured",
            )
        return records

    def __call__(self, removed: list[int]) -> dict[str, Any]:
        return self.evaluate_many([removed])[0]
