"""Block Influence profiling (ShortGPT, Men et al. 2024).

    BI_i = 1 - mean over real tokens t of cos(x_{i,t}, x_{i+1,t})

where x_i is the hidden state entering decoder layer i and x_{i+1} the one leaving it. An observer on the pass
engine (:mod:`shortgpt_serve.passes`) reads each layer's own input and output (the last layer's output is taken
before the final norm); cosines are computed row-wise per token in float32 and summed as the pass goes: no
token-by-token matrices and no stored activations.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shortgpt_serve.passes import Batch, PassEngine, Route

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

    from shortgpt_serve.models.families import Family

log = logging.getLogger(__name__)


def block_influence_sums(h_in: torch.Tensor, h_out: torch.Tensor, mask: torch.Tensor | None) -> tuple[float, int]:
    """Sum over real tokens of cos(h_in, h_out), and how many tokens were summed.

    h_in, h_out: [batch, seq, hidden]; mask: [batch, seq], nonzero on real tokens (None: all real).
    """
    import torch

    cos = torch.nn.functional.cosine_similarity(h_in.float(), h_out.float(), dim=-1, eps=1e-8)  # [batch, seq]
    if mask is not None:
        keep = mask.bool()
        return float(cos[keep].sum(dtype=torch.float64)), int(keep.sum())
    return float(cos.sum(dtype=torch.float64)), cos.numel()


def block_influence(h_in: torch.Tensor, h_out: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """BI of one layer from its input and output hidden states (see :func:`block_influence_sums`)."""
    total, count = block_influence_sums(h_in, h_out, mask)
    return 1.0 - total / count


@dataclass(frozen=True)
class LayerProfile:
    """Block Influence of every decoder layer of one model on one calibration set."""

    bi: list[float]
    num_tokens: int
    num_sequences: int
    seq_len: int
    calibration_source: str
    calibration_sha256: str
    model_sha256: str = ""
    seconds: float = 0.0
    angular: list[list[float]] | None = None
    """Mean angular distance between layer boundaries i < j (only for the angular criterion)."""
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return len(self.bi)

    def ranking(self) -> list[int]:
        """Layer indices from least to most influential."""
        return sorted(range(self.num_layers), key=lambda i: (self.bi[i], i))

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> LayerProfile:
        return cls(**json.loads(text))

    def save(self, path: Path) -> None:
        from shortgpt_serve.fsutil import atomic_write_text

        atomic_write_text(path, self.to_json())

    def table(self, removed: Iterable[int] = ()) -> str:
        """A readable table: layer, BI, rank (0 = least influential), a bar, and which layers are removed."""
        gone = set(removed)
        rank = {layer: r for r, layer in enumerate(self.ranking())}
        top = max(self.bi) or 1.0
        lines = [f"{'layer':>5}  {'BI':>8}  {'rank':>4}  {'':<30}", f"{'-' * 5}  {'-' * 8}  {'-' * 4}  {'-' * 30}"]
        for i, v in enumerate(self.bi):
            bar = "#" * max(1, round(30 * max(v, 0.0) / top)) if v > 0 else ""
            mark = "  removed" if i in gone else ""
            lines.append(f"{i:>5}  {v:>8.5f}  {rank[i]:>4}  {bar:<30}{mark}")
        return "\n".join(lines)


class BlockInfluence:
    """Observer: per layer, the sum over real tokens of cos(input, output) and the tokens summed."""

    def __init__(self, num_layers: int) -> None:
        self.sums = [0.0] * num_layers
        self.counts = [0] * num_layers

    def __call__(self, layer: int, batch: int, h_in: torch.Tensor, h_out: torch.Tensor, mask: torch.Tensor) -> None:
        s, c = block_influence_sums(h_in, h_out, mask)
        self.sums[layer] += s
        self.counts[layer] += c

    def bi(self) -> list[float]:
        """BI of every observed layer; +inf for a layer the route skipped (never a removal candidate again)."""
        return [1.0 - s / c if c else math.inf for s, c in zip(self.sums, self.counts, strict=True)]


def _as_batches(batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> list[Batch]:
    return [Batch(ids, mask) for ids, mask in batches]


def block_influences(
    engine: PassEngine, batches: Sequence[Batch], skip: Iterable[int] = (), *, progress: bool = False
) -> tuple[list[float], int]:
    """(BI per layer, real tokens counted) in one pass; layers in ``skip`` are skipped and get +inf."""
    observer = BlockInfluence(engine.num_layers)
    bar = "Profiling Block Influence" if progress else None
    engine.run(batches, [Route(frozenset(skip), observers=[observer])], progress=bar)
    tokens = sum(int(b.attention_mask.sum()) for b in batches)
    if tokens == 0:
        raise ValueError("no calibration tokens were profiled")
    return observer.bi(), tokens


def profile_layers(
    model: PreTrainedModel | PassEngine,
    family: Family | None,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    progress: bool = True,
) -> tuple[list[float], int]:
    """Run the model over calibration batches ((input_ids, attention_mask) pairs) and return (BI per layer,
    tokens counted)."""
    engine = model if isinstance(model, PassEngine) else PassEngine(model, family) if family else PassEngine.of(model)
    return block_influences(engine, _as_batches(batches), progress=progress)


def profile_model(
    engine: PassEngine,
    calibration: Any,
    *,
    batch_size: int,
    model_sha256: str = "",
    angular: bool = False,
    progress: bool = False,
) -> LayerProfile:
    """Profile a model on a :class:`~shortgpt_serve.calibration.CalibrationSet` (and its angular distances)."""
    from shortgpt_serve.calibration import batches

    pad = getattr(engine.model.config, "pad_token_id", None) or 0
    start = time.perf_counter()
    chunks = _as_batches(batches(calibration.sequences, batch_size, int(pad)))
    bi, tokens = block_influences(engine, chunks, progress=progress)
    return LayerProfile(
        bi=bi,
        num_tokens=tokens,
        num_sequences=len(calibration.sequences),
        seq_len=calibration.seq_len,
        calibration_source=calibration.source,
        calibration_sha256=calibration.documents_sha256,
        model_sha256=model_sha256,
        seconds=round(time.perf_counter() - start, 3),
        angular=angular_distances(engine, chunks) if angular else None,
    )


class _Boundaries:
    """Observer: the normalised real-token states at every layer boundary of one batch."""

    def __init__(self, num_layers: int) -> None:
        self.num_layers = num_layers
        self.states: dict[int, torch.Tensor] = {}

    def __call__(self, layer: int, batch: int, h_in: torch.Tensor, h_out: torch.Tensor, mask: torch.Tensor) -> None:
        import torch

        keep = mask.bool()
        self.states[layer] = torch.nn.functional.normalize(h_in[keep].float(), dim=-1)
        if layer == self.num_layers - 1:
            self.states[layer + 1] = torch.nn.functional.normalize(h_out[keep].float(), dim=-1)


def angular_distances(
    model: PreTrainedModel | PassEngine,
    batches: Sequence[Batch] | Iterable[tuple[torch.Tensor, torch.Tensor]],
) -> list[list[float]]:
    """Mean angular distance ``arccos(cos(x_i, x_j)) / pi`` between every pair of layer boundaries i < j.

    Boundary i is the hidden state entering layer i (boundary L: leaving the last layer, before the final norm).
    Gromov et al. remove the block of n layers starting where ``d[l][l + n]`` is smallest. They average over
    each sequence's final token; we average over every real token, which gives far more samples per pair.
    Every pair needs both boundaries at once, so this runs one pass per batch and holds one batch's boundary
    states at a time.
    """
    import torch

    engine = model if isinstance(model, PassEngine) else PassEngine.of(model)
    n = engine.num_layers
    chunks = [b if isinstance(b, Batch) else Batch(*b) for b in batches]
    sums = torch.zeros(n + 1, n + 1, dtype=torch.float64)
    count = 0
    for chunk in chunks:
        seen = _Boundaries(n)
        engine.run([chunk], [Route(observers=[seen])])
        stacked = torch.stack([seen.states[i] for i in range(n + 1)])  # [n+1, tokens, hidden]
        cos = torch.einsum("ith,jth->ijt", stacked, stacked).clamp(-1.0, 1.0)
        sums += (torch.arccos(cos) / torch.pi).sum(-1, dtype=torch.float64).cpu()
        count += stacked.shape[1]
    if count == 0:
        raise ValueError("no calibration tokens were profiled")
    result: list[list[float]] = (sums / count).tolist()
    return result


def iterative_bi_order(
    engine: PassEngine,
    batches: Sequence[Batch],
    first_bi: list[float],
    allowed: Iterable[int],
    stop: Callable[[list[int]], bool],
) -> list[int]:
    """Remove the lowest-BI layer, re-profile the shortened model (those layers skipped), repeat until
    ``stop(order)`` or nothing is left to remove."""
    left = set(allowed)
    order: list[int] = []
    bi = first_bi
    while left - set(order) and not stop(order):
        pick = min(left - set(order), key=lambda i: (bi[i], i))
        order.append(pick)
        if stop(order) or not left - set(order):
            break
        log.info("iterative-bi: removed %s; re-profiling %d layers", sorted(order), engine.num_layers - len(order))
        bi, _ = block_influences(engine, batches, skip=order)
    return order
