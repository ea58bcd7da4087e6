"""Held-out perplexity on the pass engine: exp(mean negative log-likelihood per predicted token)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from shortgpt_serve.calibration import batches
from shortgpt_serve.errors import QualityError
from shortgpt_serve.passes import Batch, PassEngine, Route
from shortgpt_serve.quality.scoring import max_positions, pad_id, special_prefix

CHUNK_ELEMENTS = 4 << 20
"""Logits scored at once (16 MiB in float32): a slice's float32 copy and log-softmax, not the batch's."""


def chunk_rows(vocab: int) -> int:
    """Positions scored at once for a vocabulary of ``vocab``: 131 at 32,000 tokens, 32 at 128,256."""
    return max(1, CHUNK_ELEMENTS // max(1, vocab))


if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def perplexity_batches(
    tokenizer: PreTrainedTokenizerBase,
    documents: Sequence[str],
    *,
    max_tokens: int,
    seq_len: int,
    batch_size: int,
    max_len: int | None,
) -> list[Batch]:
    """Packed like calibration: each document plus "\\n\\n" is encoded without special tokens into one stream (cut
    at ``max_tokens``), cut into blocks that each start with the tokenizer's own prefix. Every block token after
    the first is predicted. ``seq_len`` is capped at ``max_len`` (the model's maximum positions)."""
    prefix = special_prefix(tokenizer)
    if max_len is not None:
        seq_len = min(seq_len, max_len)
    body = seq_len - len(prefix)
    if body < 2:
        raise QualityError(f"seq_len {seq_len} leaves too little room after the tokenizer's prefix; raise it.")
    stream: list[int] = []
    for doc in documents:
        if doc.strip():
            stream.extend(tokenizer(doc + "\n\n", add_special_tokens=False).input_ids)
        if len(stream) >= max_tokens:
            break
    stream = stream[:max_tokens]
    blocks = [prefix + stream[i : i + body] for i in range(0, len(stream), body)]
    blocks = [b for b in blocks if len(b) >= 2]
    if not blocks:
        raise QualityError("the held-out text is too short to measure perplexity; give more documents.")
    return [Batch(ids, mask) for ids, mask in batches(blocks, batch_size, pad_id(tokenizer))]


class NegLogLikelihood:
    """Sums the negative log-likelihood of every predicted (non-pad) token of the batches it reads."""

    def __init__(self, blocks: Sequence[Batch]) -> None:
        self.blocks = blocks
        self.total, self.count = 0.0, 0

    def __call__(self, b: int, logits: torch.Tensor) -> None:
        import torch

        ids, mask = self.blocks[b].input_ids.to(logits.device), self.blocks[b].attention_mask.to(logits.device)
        targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100).reshape(-1)
        shifted = logits[:, :-1].reshape(-1, logits.shape[-1])  # a view where the rows are contiguous
        # Summed on the device and read once per batch: one synchronisation, not one per slice.
        total = torch.zeros((), dtype=torch.float64, device=logits.device)
        step = chunk_rows(logits.shape[-1])
        for at in range(0, shifted.shape[0], step):
            nll = torch.nn.functional.cross_entropy(
                shifted[at : at + step].float(), targets[at : at + step], ignore_index=-100, reduction="sum"
            )
            total += nll.double()
        self.total += float(total)
        self.count += int((targets != -100).sum())

    @property
    def perplexity(self) -> float:
        return math.exp(self.total / self.count)


def perplexities_along(engine: PassEngine, blocks: Sequence[Batch], skips: Iterable[Iterable[int]]) -> list[float]:
    """The perplexity of ``blocks`` with each skip-set's layers skipped, all in one pass."""
    sets = [frozenset(s) for s in skips]
    readers = [NegLogLikelihood(blocks) for _ in sets]
    engine.run(blocks, [Route(s, on_logits=r) for s, r in zip(sets, readers, strict=True)])
    return [r.perplexity for r in readers]


def perplexity(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    documents: Sequence[str],
    *,
    max_tokens: int = 8192,
    seq_len: int = 512,
    batch_size: int = 4,
    skip: Iterable[int] = (),
) -> float:
    """exp(mean negative log-likelihood per predicted token) over held-out documents (see
    :func:`perplexity_batches` for how they are packed)."""
    blocks = perplexity_batches(
        tokenizer,
        documents,
        max_tokens=max_tokens,
        seq_len=seq_len,
        batch_size=batch_size,
        max_len=max_positions(model),
    )
    return perplexities_along(PassEngine.of(model), blocks, [list(skip)])[0]
