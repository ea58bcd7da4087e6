"""How far a shortened model's next-token distribution lies from the full model's, on the held-out perplexity text.

At every position perplexity scores (a real next token follows), two numbers compare the candidate with the full
model: KL(full || shortened) in nats, from both log-softmaxes in float32, and whether the two models' most likely
next tokens agree (top-1 agreement). Accuracy on a few hundred items moves in steps of a fraction of a percent and
mostly by noise; these read every token of the text and see damage before it flips an answer.

Memory stays small: an observer on the full model's route keeps its states leaving the last decoder layer (before
the final norm) for the perplexity blocks, tokens x hidden; when a candidate's logits for a block arrive, the full
model's logits are computed from those states through the model's own head, one sequence at a time, so nothing
vocabulary-sized outlives one sequence's comparison.

Standard errors take each sequence (block row) as one cluster, since neighbouring tokens are not independent:
the ratio estimator's variance over sequences, sum_s (x_s - R n_s)^2 / (sum_s n_s)^2 x m / (m - 1).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from shortgpt_serve.passes import Batch, PassEngine
from shortgpt_serve.quality.perplexity import chunk_rows

if TYPE_CHECKING:
    import torch


class FinalStates:
    """An observer for the full model's route: keeps the output of the last decoder layer for each batch from
    ``offset`` on (those batches are the perplexity blocks of a pass that also scores requests)."""

    def __init__(self, last_layer: int, offset: int, count: int) -> None:
        self.last_layer, self.offset = last_layer, offset
        self.states: list[torch.Tensor | None] = [None] * count

    def __call__(self, layer: int, batch: int, h_in: torch.Tensor, h_out: torch.Tensor, mask: torch.Tensor) -> None:
        if layer == self.last_layer and batch >= self.offset:
            self.states[batch - self.offset] = h_out


@dataclass(frozen=True)
class DivergenceStats:
    """A candidate's next-token distribution against the full model's over the held-out text."""

    kl: float
    """Mean KL(full || shortened) per predicted token, in nats."""
    kl_se: float | None
    """Its standard error, sequences as clusters (None with a single sequence)."""
    agreement: float
    """Share of predicted tokens where both models' most likely next token is the same."""
    agreement_se: float | None
    tokens: int
    sequences: int

    @classmethod
    def identical(cls, tokens: int, sequences: int) -> DivergenceStats:
        """The full model against itself: no divergence, full agreement, by definition."""
        return cls(0.0, 0.0, 1.0, 0.0, tokens, sequences)


def ratio_se(sums: Sequence[float], counts: Sequence[int]) -> float | None:
    """Standard error of sum(sums) / sum(counts) with each (sum, count) one cluster (None below two clusters)."""
    m, total = len(sums), sum(counts)
    if m < 2 or total == 0:
        return None
    ratio = sum(sums) / total
    spread = sum((s - ratio * n) ** 2 for s, n in zip(sums, counts, strict=True))
    return math.sqrt(spread * m / (m - 1)) / total


class Divergence:
    """Reads a candidate's logits for the perplexity blocks and compares them with the full model's, computed
    from ``full_states`` (filled, by the time the logits arrive, by a :class:`FinalStates` or an earlier pass)."""

    def __init__(self, engine: PassEngine, blocks: Sequence[Batch], full_states: Sequence[torch.Tensor | None]) -> None:
        self.engine, self.blocks, self.full_states = engine, blocks, full_states
        self.rows: list[tuple[float, int, int]] = []
        """Per sequence: (summed KL, agreeing positions, predicted positions)."""

    def __call__(self, b: int, logits: torch.Tensor) -> None:
        import torch

        states = self.full_states[b]
        if states is None:
            raise RuntimeError(f"the full model's final states for perplexity block {b} were not kept.")
        block = self.blocks[b]
        for r in range(logits.shape[0]):
            # Position t predicts token t + 1: scored where that token is real (as perplexity scores it).
            valid = block.attention_mask[r, 1:].to(logits.device) != 0
            if not bool(valid.any()):
                continue
            row = Batch(block.input_ids[r : r + 1], block.attention_mask[r : r + 1])
            full = self.engine.logits(states[r : r + 1], row)[0, :-1][valid]
            short = logits[r, :-1][valid]
            # Summed on the device and read once per sequence (one synchronisation, not one per chunk); each
            # chunk's float32 log-softmaxes are 16 MiB each (chunk_rows).
            kl = torch.zeros((), dtype=torch.float64, device=logits.device)
            agree = torch.zeros((), dtype=torch.int64, device=logits.device)
            step = chunk_rows(short.shape[-1])
            for at in range(0, short.shape[0], step):
                lp_full = full[at : at + step].float().log_softmax(-1)
                lp_short = short[at : at + step].float().log_softmax(-1)
                kl += (lp_full.exp() * (lp_full - lp_short)).sum(-1).double().sum()
                agree += (lp_full.argmax(-1) == lp_short.argmax(-1)).sum()
            self.rows.append((float(kl), int(agree), int(valid.sum())))

    @property
    def stats(self) -> DivergenceStats | None:
        counts = [n for _, _, n in self.rows]
        if not sum(counts):
            return None
        kls, agrees = [k for k, _, _ in self.rows], [float(a) for _, a, _ in self.rows]
        return DivergenceStats(
            kl=sum(kls) / sum(counts),
            kl_se=ratio_se(kls, counts),
            agreement=sum(agrees) / sum(counts),
            agreement_se=ratio_se(agrees, counts),
            tokens=sum(counts),
            sequences=len(counts),
        )


def block_positions(blocks: Sequence[Batch]) -> tuple[int, int]:
    """(predicted positions, sequences with at least one) of the perplexity blocks."""
    tokens = sequences = 0
    for block in blocks:
        per_row = (block.attention_mask[:, 1:] != 0).sum(-1)
        tokens += int(per_row.sum())
        sequences += int((per_row > 0).sum())
    return tokens, sequences
