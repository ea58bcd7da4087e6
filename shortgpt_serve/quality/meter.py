"""The quality meter: the full model's scores (cached on disk) and candidates', a pass of the engine per call.

Every call scores the benchmark items, the LAMBADA last words and the held-out perplexity of the full model or of
any number of candidates in one pass: the requests and perplexity blocks are encoded once, and candidates share
the full model's hidden states up to the first layer they skip or run in a healed form. The full model's states
at chosen layer boundaries are kept from one pass to the next (``resume_at``), so a later candidate starts at the
deepest one before its first changed layer instead of recomputing the layers every candidate shares. Its states
leaving the last layer on the perplexity blocks are kept too, so each candidate's next-token distribution is
compared with the full model's (:mod:`~shortgpt_serve.quality.divergence`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from shortgpt_serve import cache
from shortgpt_serve.errors import QualityError
from shortgpt_serve.passes import Batch, Boundary, PassEngine, Route
from shortgpt_serve.quality.bootstrap import gain_interval, interval_or_none, retained_interval
from shortgpt_serve.quality.divergence import Divergence, DivergenceStats, FinalStates, block_positions
from shortgpt_serve.quality.lambada import GreedyScore, lambada_requests, requests_sha256
from shortgpt_serve.quality.perplexity import NegLogLikelihood, perplexity_batches
from shortgpt_serve.quality.record import Measured, describe, quality_record
from shortgpt_serve.quality.retained import quality_retained
from shortgpt_serve.quality.scoring import (
    LogLikelihood,
    RequestBatches,
    TaskScore,
    check_items,
    item_correct,
    max_positions,
    task_scores,
)
from shortgpt_serve.quality.tasks import load_items

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

    from shortgpt_serve.config import Config
    from shortgpt_serve.models.source import ModelSource

__all__ = ["Measured", "QualityMeter", "quality_record"]

log = logging.getLogger(__name__)

Replacement = Mapping[int, "torch.nn.Module"]
"""Layers a candidate runs through its own modules (healed copies) instead of the model's."""


class QualityMeter:
    """Scores the full model once (cached on disk) and candidates by skipping (or replacing) layers in one pass
    each."""

    def __init__(
        self,
        config: Config,
        source: ModelSource,
        engine: PassEngine,
        tokenizer: PreTrainedTokenizerBase,
        heldout: list[str],
        key: dict[str, Any],
        exclude: Collection[str] = (),
    ) -> None:
        """``key``: the full model's scores' cache key (:func:`shortgpt_serve.keys.quality_key`). ``exclude``:
        documents no LAMBADA item may come from (the calibration documents the profile read)."""
        q = config.quality
        self.config, self.source, self.engine, self.tokenizer = config, source, engine, tokenizer
        self.items = [item for task in q.tasks for item in load_items(task, q.limit, q.seed)]
        check_items(self.items)
        self.chances: dict[str, list[float]] = {}
        for item in self.items:
            self.chances.setdefault(item.task, []).append(1.0 / len(item.requests))
        self.heldout = heldout
        if q.perplexity_tokens and not heldout:
            log.warning("No held-out documents (calibration.heldout_fraction or too little text): perplexity skipped")
        self.lambada = lambada_requests(q.lambada_limit, q.seed, heldout, exclude)
        self._lambada_sha = requests_sha256(self.lambada)
        self.evaluations = 0
        self.passes = 0
        self.progress = True
        """Show a progress bar over the layers of each pass."""
        self.full_scores: dict[str, TaskScore] = {}
        self.full_correct: dict[str, list[bool]] = {}
        self.full: dict[str, Any] = {}
        self.key = key
        self._requests: RequestBatches | None = None
        self._blocks: list[Batch] = []
        self._final: list[torch.Tensor | None] | None = None
        """The full model's states leaving its last layer on each perplexity block, once a pass computed them."""
        self._ahead: dict[tuple[int, ...], Measured] = {}
        """Plain removals (no healing) already measured: ahead of being asked for (in the full model's pass) or by
        an earlier call; asked again (a healed candidate's plain twin), they are not measured again."""
        self.resume_at: set[int] = set()
        """Layer boundaries where the full model's states are kept, once a pass computes them, so that a later
        candidate whose first changed layer lies at or after one starts there (set by the caller, which knows
        which candidates may come)."""
        self._boundaries: dict[int, Boundary] = {}

    def _prepare(self) -> tuple[RequestBatches, list[Batch]]:
        if self._requests is None:
            q = self.config.quality
            max_len = max_positions(self.engine.model)
            flat = [r for item in self.items for r in item.requests] + self.lambada
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

    def _final_states(self, blocks: list[Batch]) -> list[torch.Tensor | None]:
        """The full model's last-layer states on the perplexity blocks: one pass over the blocks alone when no
        earlier pass kept them (the full model's scores came from the cache)."""
        if self._final is None:
            final = FinalStates(self.engine.num_layers - 1, 0, len(blocks))
            self.engine.run(
                blocks, [Route(observers=[final])], progress="Full model on held-out text" if self.progress else None
            )
            self.passes += 1
            self._final = final.states
        return self._final

    def _measure(
        self, removals: Sequence[Sequence[int]], replacements: Sequence[Replacement] | None = None
    ) -> list[Measured]:
        """Each candidate's scores, perplexity, LAMBADA and divergence from the full model, with its removed
        layers skipped and its replaced layers run through its own modules, in one pass of the engine."""
        requests, blocks = self._prepare()
        reps: list[Replacement] = list(replacements) if replacements is not None else [{} for _ in removals]
        if len(reps) != len(removals):
            raise QualityError(f"{len(reps)} sets of replacement layers for {len(removals)} candidates.")
        for removed, rep in zip(removals, reps, strict=True):
            if set(removed) & set(rep):
                raise QualityError(f"layers {sorted(set(removed) & set(rep))} are both removed and replaced.")
        n_req, n_mc = len(requests.batches), sum(len(item.requests) for item in self.items)
        unchanged = [not removed and not rep for removed, rep in zip(removals, reps, strict=True)]
        observer: FinalStates | None = None
        states: list[torch.Tensor | None] = []
        if blocks and self._final is None and unchanged and unchanged[0]:
            # The full model leads this pass: its route keeps its last states before any candidate's reader runs.
            observer = FinalStates(self.engine.num_layers - 1, n_req, len(blocks))
            states = observer.states
        elif blocks and not all(unchanged):
            states = self._final_states(blocks)
        routes: list[Route] = []
        outcomes: list[tuple[list[LogLikelihood], list[bool], NegLogLikelihood, Divergence | None]] = []
        for n, (removed, rep) in enumerate(zip(removals, reps, strict=True)):
            lls: list[LogLikelihood] = [(0.0, 0)] * len(requests.encoded)
            greedy = [False] * len(requests.encoded)
            nll = NegLogLikelihood(blocks)
            div = None if unchanged[n] or not blocks else Divergence(self.engine, blocks, states)
            read_ll = requests.reader(lls, greedy)

            def read(
                b: int, logits: torch.Tensor, read_ll: Any = read_ll, nll: NegLogLikelihood = nll, div: Any = div
            ) -> None:
                if b < n_req:
                    read_ll(b, logits)
                    return
                nll(b - n_req, logits)
                if div is not None:
                    div(b - n_req, logits)

            watch = [observer] if observer is not None and n == 0 else []
            routes.append(Route(frozenset(removed), observers=watch, on_logits=read, replace=dict(rep)))
            outcomes.append((lls, greedy, nll, div))
        what = "the full model" if unchanged == [True] else f"{len(removals)} model(s)"
        # Start at the deepest kept boundary at or before every candidate's first changed layer.
        first = min(
            (min({*r, *m}) for r, m in zip(removals, reps, strict=True) if r or m), default=self.engine.num_layers
        )
        start = max((b for b in self._boundaries.values() if b.layer <= first), key=lambda b: b.layer, default=None)
        keep = {i for i in self.resume_at if i < self.engine.num_layers} - set(self._boundaries)
        kept = self.engine.run(
            [*requests.batches, *blocks],
            routes,
            progress=f"Scoring {what}" if self.progress else None,
            keep=keep,
            start=start,
        )
        self._boundaries.update(kept)
        self.passes += 1
        if observer is not None:
            self._final = observer.states
        tokens, sequences = block_positions(blocks)
        results = []
        for (lls, greedy, nll, div), same in zip(outcomes, unchanged, strict=True):
            divergence = div.stats if div is not None else None
            if same and blocks and tokens:
                divergence = DivergenceStats.identical(tokens, sequences)
            results.append(
                Measured(
                    scores=task_scores(self.items, lls[:n_mc]),
                    perplexity=nll.perplexity if blocks else None,
                    correct=item_correct(self.items, lls[:n_mc]),
                    lambada=greedy[n_mc:] if self.lambada else None,
                    divergence=divergence,
                )
            )
        return results

    def _cached_value_fits(self, data: Mapping[str, Any]) -> bool:
        """Whether a cached full-model entry holds all this meter reads: per-item outcomes for every task, and
        LAMBADA outcomes on the same items (the cache key does not name them; older entries lack them)."""
        correct, scores = data.get("correct"), data.get("scores")
        if not isinstance(correct, dict) or not isinstance(scores, dict) or set(correct) != set(scores):
            return False
        if any(not isinstance(correct[t], list) or len(correct[t]) != scores[t].get("n") for t in scores):
            return False
        if not self.lambada:
            return True
        lam = data.get("lambada")
        return (
            isinstance(lam, dict)
            and lam.get("items_sha256") == self._lambada_sha
            and isinstance(lam.get("correct"), list)
            and len(lam["correct"]) == len(self.lambada)
        )

    def measure_full(self, ahead: Sequence[Sequence[int]] = ()) -> dict[str, Any]:
        """The full model's scores, from the cache when the same model, data and settings were measured before.

        ``ahead``: candidates that will be asked for next; when the full model has to be scored, they are scored
        in the same pass (sharing its states up to the first layer each skips) and kept for that call.
        """

        def measure() -> dict[str, Any]:
            log.info("Scoring the full model on %s", ", ".join(self.config.quality.tasks))
            extra = [list(r) for r in ahead if r]
            full, *more = self._measure([[], *extra])
            self._ahead.update((tuple(sorted(r)), m) for r, m in zip(extra, more, strict=True))
            lam = (
                None
                if full.lambada is None
                else {"correct": [int(c) for c in full.lambada], "items_sha256": self._lambada_sha}
            )
            return {
                "scores": {t: dataclasses.asdict(s) for t, s in full.scores.items()},
                "perplexity": full.perplexity,
                "correct": {t: [int(c) for c in v] for t, v in full.correct.items()},
                "lambada": lam,
            }

        def summary(d: Any) -> str:
            tasks = ", ".join(f"{t} {s['acc']:.3f}" for t, s in d["scores"].items())
            return f"{self.source.name}: full-model scores (acc) {tasks}"

        cache_dir = self.config.resolved_cache_dir()
        data, reused = cache.cached_json(cache_dir, "quality", self.key, measure, summary)
        if reused and not self._cached_value_fits(data):
            log.info("Cached full-model scores lack per-item or LAMBADA outcomes for these items: measuring again")
            data = measure()
            cache.store_json(cache_dir, "quality", self.key, data, summary(data))
            reused = False
        if reused:
            log.info("Full-model scores reused from the cache (quality/%s)", cache.entry_name("quality", self.key))
        self.full_scores = {t: TaskScore(**s) for t, s in data["scores"].items()}
        self.full_correct = {t: [bool(c) for c in v] for t, v in data["correct"].items()}
        lam = data.get("lambada") if self.lambada else None
        lambada = GreedyScore.of([bool(c) for c in lam["correct"]]) if lam else None
        measured = bool(self.config.quality.perplexity_tokens and self.heldout)
        self.full = quality_record(
            self.full_scores,
            None,
            data["perplexity"],
            divergence=DivergenceStats.identical(0, 0) if measured else None,
            lambada=lambada,
        )
        if lambada is not None:
            log.info("Full model: LAMBADA greedy last word %.3f ± %.3f (%d items)", lambada.acc, lambada.se, lambada.n)
        return self.full

    def full_record(self) -> dict[str, Any]:
        r = quality_retained(self.full_scores, self.full_scores)
        return {**self.full, "retained": 1.0, "raw_ratio": 1.0, "no_signal": list(r.no_signal)}

    def _record(self, m: Measured) -> dict[str, Any]:
        retained = quality_retained(self.full_scores, m.scores)
        q = self.config.quality
        ci = retained_interval(self.full_correct, m.correct, self.chances, q.bootstrap, q.seed) if q.bootstrap else None
        lambada = GreedyScore.of(m.lambada) if m.lambada is not None else None
        return quality_record(
            m.scores, retained, m.perplexity, divergence=m.divergence, lambada=lambada, retained_ci=interval_or_none(ci)
        )

    def _evaluate(
        self, removals: Sequence[Sequence[int]], replacements: Sequence[Replacement] | None
    ) -> list[tuple[dict[str, Any], Measured]]:
        reps: list[Replacement] = list(replacements) if replacements is not None else [{} for _ in removals]
        if len(reps) != len(removals):
            raise QualityError(f"{len(reps)} sets of replacement layers for {len(removals)} candidates.")
        for removed, rep in zip(removals, reps, strict=True):
            healed = f" ({len(rep)} replaced: {sorted(rep)})" if rep else ""
            log.info("Scoring %d layers removed: %s%s", len(removed), list(removed), healed)

        def ahead(i: int) -> bool:
            return not reps[i] and tuple(sorted(removals[i])) in self._ahead

        todo = [i for i in range(len(removals)) if not ahead(i)]
        fresh = self._measure([removals[i] for i in todo], [reps[i] for i in todo]) if todo else []
        measured = dict(zip(todo, fresh, strict=True))
        self._ahead.update((tuple(sorted(removals[i])), m) for i, m in measured.items() if not reps[i])
        out = []
        for i, removed in enumerate(removals):
            m = measured[i] if i in measured else self._ahead[tuple(sorted(removed))]
            self.evaluations += 1
            record = self._record(m)
            out.append((record, m))
            log.info(describe(list(removed), record))
        return out

    def evaluate_many(
        self, removals: Sequence[Sequence[int]], replacements: Sequence[Replacement] | None = None
    ) -> list[dict[str, Any]]:
        """Each candidate's quality record (as :func:`quality_record`), all scored in one pass. ``replacements``:
        parallel to ``removals``, the layers each candidate runs through its own (healed) modules."""
        return [record for record, _ in self._evaluate(removals, replacements)]

    def healed_pair(self, removed: Sequence[int], replace: Replacement) -> tuple[dict[str, Any], dict[str, Any]]:
        """The plain and the healed candidate's records, scored in one pass; the healed one also carries
        ``gain_ci``: the 95% paired bootstrap interval of its retained minus the plain one's (None when not
        computed), so a reader can tell a gain from noise."""
        (plain, p), (healed, h) = self._evaluate([removed, removed], [{}, replace])
        q = self.config.quality
        gain = gain_interval(self.full_correct, p.correct, h.correct, self.chances, q.bootstrap, q.seed)
        healed["gain_ci"] = interval_or_none(gain)
        if healed["gain_ci"]:
            low, high = healed["gain_ci"]
            log.info(
                "  healed minus plain retained %+.3f, 95%% CI [%+.3f, %+.3f]%s",
                healed["retained"] - plain["retained"],
                low,
                high,
                " (within noise)" if low <= 0.0 <= high else "",
            )
        return plain, healed

    def __call__(self, removed: list[int], replace: Replacement | None = None) -> dict[str, Any]:
        return self.evaluate_many([removed], None if replace is None else [replace])[0]
