"""Distillation healing: a short training of the shortened model's kept layers toward the full model's outputs.

After removal (and, typically, linear healing folded into the kept layers), the shortened model is trained for a
few steps on the calibration text to match the full model's next-token distribution: the loss is the mean over real
(non-padding) token positions of KL(teacher || student), the teacher the engine's full model (no layer removed, no
gradients, in the model's dtype), the student the same model object with its decoder layers temporarily swapped for
trainable copies of the kept layers and the removed ones cut (:func:`~shortgpt_serve.models.layers.skipped_layers`
renumbers the copies and cuts the per-layer config, as for plain removal). Log-softmax is taken in float32.

Only the kept decoder layers are trained: the embeddings, the final norm and the LM head are shared with the full
model and stay frozen (gradients go to the copies only, ``backward(inputs=...)``), so the engine's model is left
exactly as it was. The result is one trained copy per kept layer, in the model's dtype: the checkpoint keeps the
standard architecture and its kept layers' tensors are replaced by the copies' (KD healing of pruned LLMs, as in
Minitron, 2024; here a few steps only, on the calibration text).

The teacher's side costs one pass: the full model's states leaving its last decoder layer are computed once for
every calibration sequence (by the pass engine, one layer at a time) and kept (sequence x hidden per sequence, far
smaller than its logits); each step turns them into the teacher's logits with the final norm and the head only.

Training: the calibration batches are re-split into micro-batches of ``batch_size`` sequences, shuffled with the
seed (and reshuffled each time the data runs out); AdamW without weight decay, a linear warm-up over the first 5% of
the steps then cosine decay, gradient norm clipped at 1.0. The seed fixes the order and the global torch seed, so
two runs on the same machine give the same weights.

Precision: for bfloat16 or float16 models the copies are trained in float32 and cast back at the end. AdamW moves
each weight by about the learning rate per step (1e-4 by default), less than half a bfloat16 step (2^-8 relative)
for any weight above about 0.05 in magnitude, so trained in bfloat16 those updates would round away every step; in
float32 they add up, and the cast keeps what exceeds half a step. (Norm scales near 1 have steps of 2^-7: a short
run at a small learning rate may leave them as they were.) Each copy runs its layer in float32 and hands its output
back in the model's dtype, so the residual stream between layers, the final norm and the head see what they see in
the served model.

Memory: the kept layers' float32 weights, their gradients, AdamW's two moment buffers and the temporary of its
step on a GPU (20 bytes per trained parameter, measured) on top of the model itself, the teacher's final states
(tokens x hidden), plus one micro-batch's activations and two logit tensors (sequence x vocab).
That fits a small or mid-sized model in memory; where it does not, or the layers are streamed, low-rank adapters
are trained one layer at a time instead (:mod:`shortgpt_serve.healing.layerwise`, chosen by
:func:`shortgpt_serve.healing.evaluate.distill_rank`).
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from shortgpt_serve.errors import HealingError
from shortgpt_serve.healing.linear import TOKENS_PER_DIM
from shortgpt_serve.healing.training import Training
from shortgpt_serve.models.layers import decoder_layers, skipped_layers
from shortgpt_serve.passes import Batch, PassEngine

if TYPE_CHECKING:
    import torch

    from shortgpt_serve.healing.adapters import LayerAdapters

log = logging.getLogger(__name__)

WINDOW = 10
"""Steps averaged for the first and last KL of the record."""


@dataclass
class Distillation:
    """The trained kept layers (original index -> copy, in the model's dtype, frozen, eval mode) and the run."""

    removed: list[int]
    layers: dict[int, torch.nn.Module] = field(repr=False)
    steps: int
    batch_size: int
    lr: float
    seed: int
    tokens: int
    """Real tokens the student was trained on, over all steps (repeats counted)."""
    seconds: float
    kl: list[float] = field(repr=False)
    """The raw KL of each step, before that step's update."""
    kl_ema: float
    """The running KL (exponential moving average) at the end."""
    rank: int = 0
    """0: the kept layers themselves were trained; N: rank-N adapters on their projections (``adapters``)."""
    adapters: dict[int, LayerAdapters] | None = field(default=None, repr=False)

    @property
    def kl_first(self) -> float:
        """Mean KL of the first steps (at most :data:`WINDOW`)."""
        head = self.kl[:WINDOW]
        return sum(head) / len(head)

    @property
    def kl_last(self) -> float:
        """Mean KL of the last steps (at most :data:`WINDOW`)."""
        tail = self.kl[-WINDOW:]
        return sum(tail) / len(tail)

    def record(self) -> dict[str, Any]:
        """What the provenance and the report keep (no tensors)."""
        return {
            "method": "distill",
            "removed": self.removed,
            "rank": self.rank,
            "steps": self.steps,
            "batch_size": self.batch_size,
            "lr": self.lr,
            "seed": self.seed,
            "tokens": self.tokens,
            "seconds": round(self.seconds, 2),
            "kl_start": round(self.kl[0], 6),
            "kl_first": round(self.kl_first, 6),
            "kl_last": round(self.kl_last, 6),
            "kl_ema_last": round(self.kl_ema, 6),
        }


def _in_float32(layer: torch.nn.Module, out_dtype: torch.dtype) -> torch.nn.Module:
    """``layer`` (float32) run on states of ``out_dtype``: input cast up, output cast back; attributes the model
    reads off its layers (``attention_type``) are the layer's."""
    import torch

    class Float32(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = layer

        def __getattr__(self, name: str) -> Any:
            try:
                return super().__getattr__(name)
            except AttributeError:
                return getattr(super().__getattr__("inner"), name)

        def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            out = self.inner(hidden_states.float(), *args, **kwargs)
            if isinstance(out, tuple):
                return (out[0].to(out_dtype), *out[1:])
            return out.to(out_dtype)

    return Float32()


@contextmanager
def _student(engine: PassEngine, removed: Sequence[int], trained: Mapping[int, torch.nn.Module]) -> Iterator[None]:
    """While held, the engine's model runs as the student: ``trained`` in place of the kept layers, ``removed``
    cut (config and ``layer_idx`` as :func:`skipped_layers` does it); the model is restored on exit."""
    import torch

    model, family = engine.model, engine.family
    layers = decoder_layers(model, family)
    *path, last = family.layers_module.split(".")
    parent: Any = model
    for part in path:
        parent = getattr(parent, part)
    setattr(parent, last, torch.nn.ModuleList([trained.get(i, layer) for i, layer in enumerate(layers)]))
    try:
        with skipped_layers(model, family, removed):
            yield
    finally:
        setattr(parent, last, layers)


def _sequences(batches: Sequence[Batch]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each calibration sequence's real tokens (ids, mask), padding dropped."""
    out = []
    for b in batches:
        if b.allowed is not None or b.position_ids is not None:
            raise ValueError("distill takes plain right-padded calibration batches (no custom attention patterns).")
        for ids, mask in zip(b.input_ids, b.attention_mask, strict=True):
            n = int(mask.sum())
            if n:
                out.append((ids[:n], mask[:n]))
    return out


def teacher_states(engine: PassEngine, batches: Sequence[Batch]) -> list[torch.Tensor]:
    """The full model's states leaving its last decoder layer (before the final norm) for each calibration
    sequence's real tokens, in :func:`_sequences`' order: one pass, so each step needs only the head for the
    teacher's logits instead of a whole forward."""
    from shortgpt_serve.passes import Route
    from shortgpt_serve.quality.divergence import FinalStates

    final = FinalStates(engine.num_layers - 1, 0, len(batches))
    engine.run(batches, [Route(observers=[final])], stop_after=engine.num_layers - 1)
    out = []
    for b, states in zip(batches, final.states, strict=True):
        assert states is not None
        for row, mask in zip(states, b.attention_mask, strict=True):
            n = int(mask.sum())
            if n:
                out.append(row[:n].clone())
    return out


def micro_batches(
    sequences: list[tuple[torch.Tensor, torch.Tensor]], batch_size: int, steps: int, seed: int
) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor]]:
    """``steps`` right-padded micro-batches of up to ``batch_size`` sequences (their indices, ids and mask), in a
    seeded order, reshuffled each time the sequences run out."""
    import torch

    g = torch.Generator().manual_seed(seed)
    made = 0
    while True:
        order = torch.randperm(len(sequences), generator=g).tolist()
        for at in range(0, len(order), batch_size):
            chosen = order[at : at + batch_size]
            group = [sequences[i] for i in chosen]
            width = max(len(ids) for ids, _ in group)
            ids = torch.zeros(len(group), width, dtype=group[0][0].dtype)
            mask = torch.zeros(len(group), width, dtype=group[0][1].dtype)
            for row, (i, m) in enumerate(group):
                ids[row, : len(i)], mask[row, : len(m)] = i, m
            yield chosen, ids, mask
            made += 1
            if made == steps:
                return


def padded(states: list[torch.Tensor], width: int) -> torch.Tensor:
    """Per-sequence states [n_i, hidden] right-padded with zeros to [len(states), width, hidden]."""

    out = states[0].new_zeros(len(states), width, states[0].shape[-1])
    for row, s in enumerate(states):
        out[row, : s.shape[0]] = s
    return out


def kl_loss(teacher: torch.Tensor, student: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over real positions of KL(teacher || student), from logits [batch, seq, vocab], in float32 (or the
    logits' dtype where it is wider)."""
    import torch

    real = mask.bool()
    dtype = torch.promote_types(student.dtype, torch.float32)
    log_p = torch.log_softmax(teacher[real].to(dtype), dim=-1)
    log_q = torch.log_softmax(student[real].to(dtype), dim=-1)
    return torch.nn.functional.kl_div(log_q, log_p, log_target=True, reduction="sum") / log_p.shape[0]


TRAINING_BYTES_PER_PARAM = 20
"""Float32 copy, gradient and AdamW's two moments of each trained parameter, and the full-size temporary AdamW's
multi-tensor step allocates on a GPU: measured on an H200 (``scripts/gpu_check.sh``, 5.4 billion trained parameters
of a 7.5B-shaped model), one step peaked 100.9 GiB beside the model, 20.0 bytes per parameter."""


def training_bytes(engine: PassEngine, removed: Sequence[int]) -> int:
    """Memory that training the kept layers themselves takes beside the model."""
    drop = set(removed)
    layers = decoder_layers(engine.model, engine.family)
    params = sum(p.numel() for i, layer in enumerate(layers) if i not in drop for p in layer.parameters())
    return TRAINING_BYTES_PER_PARAM * params


def checked(
    engine: PassEngine,
    batches: Sequence[Batch],
    removed: Sequence[int],
    start: Mapping[int, torch.nn.Module] | None,
    steps: int,
    batch_size: int,
) -> tuple[list[int], list[tuple[torch.Tensor, torch.Tensor]]]:
    """A distillation's inputs checked: the kept layers and the calibration sequences (real tokens only)."""
    if not removed:
        raise HealingError("--heal distill heals a removal; no layer is removed. Remove layers or use --heal none.")
    if steps < 1 or batch_size < 1:
        raise ValueError(f"distill needs steps >= 1 and batch_size >= 1, got {steps} and {batch_size}.")
    drop = set(removed)
    kept = [i for i in range(engine.num_layers) if i not in drop]
    stray = sorted(set(start or {}) - set(kept))
    if stray:
        raise ValueError(f"start layers {stray} are not kept layers of this removal.")
    sequences = _sequences(batches)
    tokens = sum(len(ids) for ids, _ in sequences)
    hidden = int(engine.model.config.hidden_size)
    if tokens < TOKENS_PER_DIM * hidden:
        raise HealingError(
            f"--heal distill needs at least {TOKENS_PER_DIM * hidden:,} calibration tokens ({TOKENS_PER_DIM} per "
            f"hidden dimension, {hidden}); the calibration has {tokens:,}. Raise --calibration-tokens or give more "
            "--calibration text."
        )
    return kept, sequences


def distill(
    engine: PassEngine,
    batches: Sequence[Batch],
    removed: Sequence[int],
    *,
    start: Mapping[int, torch.nn.Module] | None = None,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    progress: bool = True,
) -> Distillation:
    """Train copies of the kept layers (``start``'s where given, else the model's) of the model without
    ``removed`` toward the full model's next-token distribution on ``batches`` (see the module docstring)."""
    import torch

    from shortgpt_serve.placement import Resident

    t0 = time.perf_counter()
    model = engine.model
    if not isinstance(engine.placement, Resident):
        raise HealingError(
            "full-layer distillation needs the whole model in memory on one device; give the model work enough "
            "memory to hold it (--memory), or train low-rank adapters (heal.distill_rank)."
        )
    kept, sequences = checked(engine, batches, removed, start, steps, batch_size)
    given = dict(start or {})
    drop = set(removed)

    torch.manual_seed(seed)
    dtype = next(model.parameters()).dtype
    upcast = dtype in (torch.bfloat16, torch.float16)
    layers = decoder_layers(model, engine.family)
    trained: dict[int, torch.nn.Module] = {}
    for i in kept:
        layer = copy.deepcopy(given.get(i, layers[i])).eval()
        if upcast:
            layer.float()
        layer.requires_grad_(True)
        trained[i] = layer
    run = {i: _in_float32(m, dtype) for i, m in trained.items()} if upcast else trained
    params = [p for m in trained.values() for p in m.parameters()]
    training = Training(params, lr=lr, steps=steps, desc="Distilling the kept layers", progress=progress)

    was_training = model.training
    model.eval()
    device = engine.device
    final = teacher_states(engine, batches)
    try:
        for chosen, ids, mask in micro_batches(sequences, batch_size, steps, seed):
            ids, mask = ids.to(device), mask.to(device)
            states = padded([final[i] for i in chosen], ids.shape[1])
            teacher = engine.logits(states, Batch(ids, mask))
            with _student(engine, sorted(drop), run):
                student = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            loss = kl_loss(teacher, student, mask)
            del teacher, student
            loss.backward(inputs=params)
            training.step(loss, int(mask.sum()))
    finally:
        training.close()
        if was_training:
            model.train()
    for layer in trained.values():
        layer.requires_grad_(False)
        layer.to(dtype).eval()
    seconds = time.perf_counter() - t0
    result = Distillation(
        sorted(drop), trained, steps, batch_size, lr, seed, training.tokens, seconds, training.history, training.ema
    )
    log.info(
        "Distilled %d kept layers for %d steps (%d tokens, %.1f s): KL %.4f -> %.4f",
        len(kept),
        steps,
        training.tokens,
        seconds,
        result.kl_first,
        result.kl_last,
    )
    return result
