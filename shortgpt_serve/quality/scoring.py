"""Multiple-choice scoring by log-likelihood, on the pass engine, for several candidates in one pass.

Each choice is scored the way lm-evaluation-harness scores it: the summed log-probability of the continuation's
tokens given the context picks the answer (``acc``), or that sum divided by the continuation's length in UTF-8
bytes (``acc_norm``). Requests are encoded once, sorted by length (longest first, so memory trouble shows at
once) and right-padded into batches; one pass of the engine scores them for the full model and every candidate
skip-set together, and only the continuation positions' logits are computed and log-softmaxed (float32).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from shortgpt_serve.errors import QualityError
from shortgpt_serve.passes import Batch, PassEngine, Route
from shortgpt_serve.quality.tasks import TASKS, Item, Request

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

LogLikelihood = tuple[float, int]
"""(sum of the continuation tokens' log-probabilities given the context, their number)."""


def special_prefix(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """What the tokenizer puts before any text: [bos] for Llama-style tokenizers, nothing for others."""
    return list(tokenizer("").input_ids)


def encode_request(
    tokenizer: PreTrainedTokenizerBase, request: Request, prefix: list[int] | None = None
) -> tuple[list[int], int]:
    """(token ids of prefix + context + continuation, number of continuation tokens at the end).

    Like lm-eval: whitespace ending the context moves onto the continuation (``"Answer: "`` + ``"B"`` is scored
    as ``"Answer:"`` + ``" B"``, how the text tokenizes in running prose), and the pair is encoded together, the
    continuation being what follows the context's tokens. Text is encoded without special tokens and the
    tokenizer's own prefix is put once at the start, so tokenizers that add BOS on every call get one BOS.
    """
    if prefix is None:
        prefix = special_prefix(tokenizer)
    context, continuation = request.context, request.continuation
    n_space = len(context) - len(context.rstrip())
    if n_space:
        context, continuation = context[:-n_space], context[-n_space:] + continuation
    if not continuation:
        return list(prefix), 0

    def enc(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False).input_ids) if text else []

    ctx = enc(context)
    whole = enc(context + continuation)
    cont = whole[len(ctx) :]
    if whole[: len(ctx)] != ctx or not cont:
        # A token merged across the boundary: keep the context as it encodes alone, encode the rest separately.
        cont = enc(continuation)
    head = prefix + ctx
    if not head:
        # Nothing to condition on (empty context, no BOS): the end-of-text token is the conditioning token.
        cond = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id
        if cond is None:
            raise QualityError("the tokenizer has no BOS or EOS token to condition an empty context on.")
        head = [int(cond)]
    return head + cont, len(cont)


def _truncate(ids: list[int], n_cont: int, prefix: list[int], max_len: int | None) -> tuple[list[int], int]:
    """Cut from the left so at most ``max_len`` tokens are fed (the last token is only a target).

    The special prefix stays first, since models trained with BOS drift without it; continuation tokens that no
    longer fit are not scored.
    """
    if max_len is None or len(ids) <= max_len + 1:
        return ids, n_cont
    keep = prefix if ids[: len(prefix)] == prefix and len(prefix) < max_len else []
    ids = keep + ids[len(keep) :][-(max_len + 1 - len(keep)) :]
    return ids, min(n_cont, len(ids) - 1)


def pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    # Pad positions come after every real token (right padding), so their id never influences a score.
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id):
        if value is not None:
            return int(value)
    return 0


def max_positions(model: PreTrainedModel) -> int | None:
    value = getattr(model.config, "max_position_embeddings", None)
    return value if isinstance(value, int) and value > 1 else None


@dataclass(frozen=True)
class _Unit:
    """One row of a batch: a context's tokens and the continuations scored after it."""

    head: list[int]
    requests: list[int]
    """Indices of the requests; each one's continuation follows ``head``."""

    def width(self, encoded: list[tuple[list[int], int]]) -> int:
        # A continuation's last token is only a target; the first is predicted from the head's last position.
        return len(self.head) + sum(encoded[i][1] - 1 for i in self.requests)


def _units(encoded: list[tuple[list[int], int]], share: Callable[[int], bool]) -> list[_Unit]:
    """Requests in rows: consecutive requests with the same context tokens share one row where ``share(width)``
    allows it (the choices of one question), else each request has its own row."""
    units: list[_Unit] = []
    for i, (seq, n) in enumerate(encoded):
        if n == 0:
            continue
        head = seq[: len(seq) - n]
        if units and units[-1].head == head:
            grown = _Unit(head, [*units[-1].requests, i])
            if share(grown.width(encoded)):
                units[-1] = grown
                continue
        units.append(_Unit(head, [i]))
    return units


@dataclass(frozen=True)
class RequestBatches:
    """Requests encoded and batched once, to be scored along any number of routes.

    Where the model takes a custom attention pattern, the choices of one question share a row: the context once,
    then each continuation (but its last token, only a target) attending to the context and to itself, with the
    positions it has alone after the context. The logits are the same as for one row per choice, for about half
    the tokens on the default tasks. A row packs only while it is no longer than the model's sliding window
    (beyond it the pattern would have to differ per layer).
    """

    encoded: list[tuple[list[int], int]]
    units: list[list[_Unit]]
    """The rows of each batch."""
    batches: list[Batch]

    @classmethod
    def build(
        cls,
        tokenizer: PreTrainedTokenizerBase,
        requests: Sequence[Request],
        batch_size: int,
        engine: PassEngine | None = None,
    ) -> RequestBatches:
        """``engine``: where the batches will run (its model's positions and attention decide how rows are cut
        and packed); None: one row per request, no position limit."""
        if batch_size < 1:
            raise QualityError(f"the batch size must be at least 1 (got {batch_size}).", param="batch_size")
        max_len = max_positions(engine.model) if engine else None
        prefix = special_prefix(tokenizer)
        encoded = [_truncate(*encode_request(tokenizer, r, prefix), prefix, max_len) for r in requests]
        window = getattr(engine.model.config, "sliding_window", None) if engine else None
        caps = [v for v in (max_len, window) if isinstance(v, int) and v > 0]
        limit = min(caps) if caps else None
        pack = engine is not None and engine.custom_masks

        def share(width: int) -> bool:
            return pack and (limit is None or width <= limit)

        # Rows wider than the sliding window keep the model's own masks (its window applies); the rest may pack.
        units = sorted(_units(encoded, share), key=lambda u: (-u.width(encoded), u.requests[0]))
        wide = [u for u in units if not share(u.width(encoded))]
        narrow = [u for u in units if share(u.width(encoded))]
        pad = pad_id(tokenizer)
        wide_rows, narrow_rows = _rows(wide, batch_size), _rows(narrow, batch_size)
        made = [_batch(encoded, g, pad, False) for g in wide_rows]
        made += [_batch(encoded, g, pad, pack) for g in narrow_rows]
        return cls(encoded, wide_rows + narrow_rows, made)

    def reader(
        self, results: list[LogLikelihood], greedy: list[bool] | None = None
    ) -> Callable[[int, torch.Tensor], None]:
        """Fills ``results`` (one per request; requests with nothing to score stay (0.0, 0)) from each batch's
        logits; and ``greedy`` where given: whether every continuation token is the most likely one at its
        position (lm-eval's ``is_greedy``: the continuation is what greedy decoding would produce)."""
        import torch

        def read(b: int, logits: torch.Tensor) -> None:
            offset = self.batches[b].input_ids.shape[1] - logits.shape[1]
            for row, unit in enumerate(self.units[b]):
                at = len(unit.head)
                for i in unit.requests:
                    seq, n = self.encoded[i]
                    # Predicted at the head's last position, then at the continuation's own positions.
                    where = [len(unit.head) - 1, *range(at, at + n - 1)]
                    at += n - 1
                    index = torch.tensor(where, device=logits.device) - offset
                    logprobs = logits[row, index].float().log_softmax(-1)
                    target = torch.tensor(seq[-n:], device=logprobs.device)
                    picked = logprobs.gather(-1, target[:, None])[:, 0]
                    results[i] = (float(picked.double().sum()), n)
                    if greedy is not None:
                        greedy[i] = bool((logprobs.argmax(-1) == target).all())

        return read


def _rows(units: list[_Unit], batch_size: int) -> list[list[_Unit]]:
    """Units in batches of about ``batch_size`` requests each (as without packing)."""
    rows: list[list[_Unit]] = []
    count = batch_size
    for unit in units:
        if count >= batch_size:
            rows.append([])
            count = 0
        rows[-1].append(unit)
        count += len(unit.requests)
    return rows


def _batch(encoded: list[tuple[list[int], int]], rows: list[_Unit], pad: int, pack: bool) -> Batch:
    import torch

    width = max(u.width(encoded) for u in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    allowed = torch.zeros((len(rows), 1, width, width), dtype=torch.bool)
    for r, unit in enumerate(rows):
        h = len(unit.head)
        ids[r, :h] = torch.tensor(unit.head)
        positions[r, :h] = torch.arange(h)
        allowed[r, 0, :h, :h] = torch.ones(h, h, dtype=torch.bool).tril()
        at = h
        for i in unit.requests:
            seq, n = encoded[i]
            span = n - 1
            ids[r, at : at + span] = torch.tensor(seq[h : h + span], dtype=torch.long)
            positions[r, at : at + span] = torch.arange(h, h + span)
            allowed[r, 0, at : at + span, :h] = True
            allowed[r, 0, at : at + span, at : at + span] = torch.ones(span, span, dtype=torch.bool).tril()
            at += span
        mask[r, :at] = 1
        # Pad rows attend to themselves only: no query row is fully masked (which would give NaN states).
        pads = torch.arange(at, width)
        allowed[r, 0, pads, pads] = True
    first = min(len(u.head) - 1 for u in rows)  # the earliest position whose logits are read
    keep = width - first
    if not pack:
        return Batch(ids, mask, logits_to_keep=keep)
    return Batch(ids, mask, logits_to_keep=keep, allowed=allowed, position_ids=positions)


def loglikelihoods_along(
    engine: PassEngine,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[Request],
    skips: Iterable[Iterable[int]],
    *,
    batch_size: int = 16,
) -> list[list[LogLikelihood]]:
    """Each request's :data:`LogLikelihood` with each skip-set's layers skipped, all in one pass."""
    prepared = RequestBatches.build(tokenizer, requests, batch_size, engine)
    results: list[list[LogLikelihood]] = []
    routes = []
    for skip in skips:
        results.append([(0.0, 0)] * len(requests))
        routes.append(Route(frozenset(skip), on_logits=prepared.reader(results[-1])))
    engine.run(prepared.batches, routes)
    return results


def loglikelihoods(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[Request],
    *,
    batch_size: int = 16,
    skip: Iterable[int] = (),
) -> list[LogLikelihood]:
    """For each request, (sum of the continuation tokens' log-probabilities given the context, their number)."""
    return loglikelihoods_along(PassEngine.of(model), tokenizer, requests, [skip], batch_size=batch_size)[0]


@dataclass(frozen=True)
class TaskScore:
    task: str
    acc: float
    acc_norm: float
    n: int
    chance: float
    """Expected accuracy of guessing on these items (the mean of 1/choices; ARC has a few 3- and 5-way items)."""

    @property
    def primary_metric(self) -> str:
        spec = TASKS.get(self.task)
        return spec.primary if spec else "acc"

    @property
    def score(self) -> float:
        """The task's primary metric."""
        return float(getattr(self, self.primary_metric))


def _argmax(values: Sequence[float]) -> int:
    # First index of the maximum, like numpy.argmax: ties go to the lowest index.
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


def check_items(items: Sequence[Item]) -> None:
    for item in items:
        if not item.requests or not 0 <= item.gold < len(item.requests):
            raise QualityError(f"a {item.task} item has gold {item.gold} for {len(item.requests)} choices.")


def _hits(items: Sequence[Item], lls: Sequence[LogLikelihood]) -> Iterable[tuple[Item, bool, bool]]:
    """(item, right by acc, right by acc_norm) for every item, its choices' log-likelihoods flattened in order."""
    pos = 0
    for item in items:
        scores = [ll for ll, _ in lls[pos : pos + len(item.requests)]]
        # lm-eval's acc_norm: log-likelihood per byte of the scored text, which removes the bias to short choices.
        nbytes = [max(1, len(r.continuation.encode("utf-8"))) for r in item.requests]
        pos += len(item.requests)
        per_byte = [s / b for s, b in zip(scores, nbytes, strict=True)]
        yield item, _argmax(scores) == item.gold, _argmax(per_byte) == item.gold


def item_correct(items: Sequence[Item], lls: Sequence[LogLikelihood]) -> dict[str, list[bool]]:
    """Per task, whether each item (in order) is right on the task's primary metric: the per-item outcomes
    whose mean is :attr:`TaskScore.score` (what a paired bootstrap resamples)."""
    correct: dict[str, list[bool]] = {}
    for item, acc, acc_norm in _hits(items, lls):
        spec = TASKS.get(item.task)
        norm = spec is not None and spec.primary == "acc_norm"
        correct.setdefault(item.task, []).append(acc_norm if norm else acc)
    return correct


def task_scores(items: Sequence[Item], lls: Sequence[LogLikelihood]) -> dict[str, TaskScore]:
    """acc and acc_norm per task from every item's choices' log-likelihoods (flattened in item order)."""
    tallies: dict[str, list[float]] = {}  # task -> [acc hits, acc_norm hits, n, sum of 1/choices]
    for item, acc, acc_norm in _hits(items, lls):
        t = tallies.setdefault(item.task, [0.0, 0.0, 0.0, 0.0])
        t[0] += acc
        t[1] += acc_norm
        t[2] += 1
        t[3] += 1.0 / len(item.requests)
    return {
        task: TaskScore(task, acc=t[0] / t[2], acc_norm=t[1] / t[2], n=int(t[2]), chance=t[3] / t[2])
        for task, t in tallies.items()
    }


def score_items(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    items: Sequence[Item],
    *,
    batch_size: int = 16,
    skip: Iterable[int] = (),
) -> dict[str, TaskScore]:
    """acc and acc_norm per task over ``items`` (all requests of all items are batched together)."""
    check_items(items)
    flat = [r for item in items for r in item.requests]
    return task_scores(items, loglikelihoods(model, tokenizer, flat, batch_size=batch_size, skip=skip))
