"""Distillation of low-rank adapters one decoder layer at a time: the memory of about one layer, on any placement.

The full-layer distillation (:mod:`shortgpt_serve.healing.distill`) trains float32 copies of every kept layer with
AdamW: 20 bytes per trained parameter on top of the model, which must be whole in memory. Here each kept layer
gets low-rank adapters (:mod:`shortgpt_serve.healing.adapters`) and a step walks the stack the way a pass does,
so a placement that streams the layers from the safetensors shards brings each one in as the step reaches it:

1. **forward**, no gradients: the micro-batch's states go through the kept layers (adapters attached); the state
   entering each kept layer is kept (tokens x hidden per kept layer, in the model's dtype);
2. **head**: the student's logits from the last state, the teacher's from the full model's final states computed
   once (as the full-layer distillation does); the KL(teacher || student) over real tokens and its gradient with
   respect to the last state;
3. **backward**, layers in reverse: each layer runs again on its kept input, with gradients; the gradient at its
   output gives its adapters' gradients and the gradient at its input, which goes on to the layer before.

Then AdamW steps the adapters (gradient norm clipped, warm-up and cosine decay, seeded order: as the full-layer
distillation). The gradient is the exact gradient of the loss through the whole shortened model (a test checks it
against autograd over the model's own forward). Each streamed layer is brought twice per step, once per
direction, read ahead in each direction's order.

Memory: one layer's weights (two with the read ahead), the kept states, one layer's activations and their graph,
a block of positions' logits work at the head (teacher and student logits, their float32 log-softmaxes and the
gradient, about 64 MiB each whatever the vocabulary), the teacher's final states (tokens x hidden), and the adapters
with their gradients and AdamW's moments (20 bytes per adapter parameter, with its step's temporary).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from shortgpt_serve.healing.adapters import LayerAdapters, adapted
from shortgpt_serve.healing.distill import Distillation, checked, kl_loss, micro_batches, padded, teacher_states
from shortgpt_serve.healing.training import Training
from shortgpt_serve.models.layers import decoder_layers
from shortgpt_serve.passes import Batch, PassEngine

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

LOGIT_ELEMENTS = 1 << 24
"""Logits computed at once by a step's head (64 MiB in float32): the positions per block follow from the vocabulary."""
AUTO_RANK = 16
"""The adapters' rank where none is set and the model's layers are streamed (full layers cannot be trained)."""


def _output(value: Any) -> torch.Tensor:
    return value[0] if isinstance(value, tuple | list) else value


class _Stack:
    """The kept layers as a step runs them: a ``start`` copy where given, else the placement's layer, adapted."""

    def __init__(
        self,
        engine: PassEngine,
        kept: list[int],
        start: Mapping[int, torch.nn.Module],
        adapters: Mapping[int, LayerAdapters],
    ) -> None:
        self.engine, self.kept, self.start, self.adapters = engine, kept, start, adapters
        self._expect = getattr(engine.placement, "expect", None)
        self._brought = [i for i in kept if i not in start]

    def order(self, backwards: bool) -> None:
        """Tell a placement that reads ahead which layers come next (nothing: the order a pass takes)."""
        if self._expect is not None:
            self._expect(self._brought[::-1] if backwards else self._brought)

    def reset(self) -> None:
        if self._expect is not None:
            self._expect(())

    @contextmanager
    def layer(self, i: int) -> Iterator[torch.nn.Module]:
        """Layer ``i`` ready to run, its adapters attached."""
        if i in self.start:
            with self.adapters[i].attached(self.start[i]):
                yield self.start[i]
            return
        with self.engine.placement.layer(i) as layer, self.adapters[i].attached(layer):
            yield layer


def step_gradients(
    engine: PassEngine,
    stack: _Stack,
    batch: Batch,
    teacher: torch.Tensor,
) -> torch.Tensor:
    """One micro-batch: the adapters' gradients of the mean KL(teacher || student) set on them (``.grad``), walking
    the stack forward then backward (module docstring); returns the loss. ``teacher``: the full model's final
    states for the batch ([batch, seq, hidden], pre-norm)."""
    import torch

    with torch.no_grad():
        h, calls = engine.capture(batch)
        inputs: dict[int, torch.Tensor] = {}
        stack.order(backwards=False)
        for i in stack.kept:
            args, kwargs = calls[i]
            with stack.layer(i) as layer:
                inputs[i] = h
                h = _output(layer(h, *args, **kwargs))
    grad, loss = _head_gradient(engine, h.detach(), teacher.to(engine.device), batch)
    stack.order(backwards=True)
    for i in reversed(stack.kept):
        args, kwargs = calls[i]
        x = inputs.pop(i).detach().requires_grad_(True)
        mine = stack.adapters[i].parameters()
        with stack.layer(i) as layer:
            out = _output(layer(x, *args, **kwargs))
            grads = torch.autograd.grad(out, [x, *mine], grad_outputs=grad)
        grad = grads[0]
        for p, g in zip(mine, grads[1:], strict=True):
            p.grad = g
        del out, grads
    return loss


def _head_gradient(
    engine: PassEngine, last: torch.Tensor, teacher: torch.Tensor, batch: Batch
) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean KL(teacher || student) over the batch's real tokens and its gradient at the last layer's output,
    a block of positions at a time (the head is per position): each block's logits, their float32 log-softmaxes
    and their gradient are about :data:`LOGIT_ELEMENTS` each, whatever the vocabulary."""
    import torch

    mask = batch.attention_mask
    total = int(mask.sum())
    width = max(1, LOGIT_ELEMENTS // max(1, mask.shape[0] * int(engine.model.config.vocab_size)))
    grad = torch.zeros_like(last)
    loss = torch.zeros((), dtype=torch.float32, device=last.device)
    with engine.placement.head() as norm:
        for at in range(0, mask.shape[1], width):
            part = slice(at, at + width)
            real = int(mask[:, part].sum())
            if not real:
                continue
            piece = Batch(batch.input_ids[:, part], mask[:, part])
            x = last[:, part].detach().requires_grad_(True)
            with torch.no_grad():
                target = engine.head_logits(norm, teacher[:, part], piece)
            value = kl_loss(target, engine.head_logits(norm, x, piece), piece.attention_mask) * (real / total)
            del target
            (grad[:, part],) = torch.autograd.grad(value, [x])
            loss += value.detach()
    return grad, loss


def distill_adapters(
    engine: PassEngine,
    batches: Sequence[Batch],
    removed: Sequence[int],
    *,
    start: Mapping[int, torch.nn.Module] | None = None,
    rank: int,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    progress: bool = True,
) -> Distillation:
    """Train rank-``rank`` adapters on the kept layers (``start``'s where given, else the model's) of the model
    without ``removed`` toward the full model's next-token distribution on ``batches`` (module docstring)."""
    import torch

    t0 = time.perf_counter()
    kept, sequences = checked(engine, batches, removed, start, steps, batch_size)
    given = dict(start or {})
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    layers = decoder_layers(engine.model, engine.family)
    adapters = {i: LayerAdapters(given.get(i, layers[i]), rank, engine.device, generator) for i in kept}
    params = [p for a in adapters.values() for p in a.parameters()]
    stack = _Stack(engine, kept, given, adapters)
    was_training = engine.model.training
    engine.model.eval()
    final = teacher_states(engine, batches)
    training = Training(params, lr=lr, steps=steps, desc="Distilling adapters, layer by layer", progress=progress)
    try:
        for chosen, ids, mask in micro_batches(sequences, batch_size, steps, seed):
            batch = Batch(ids.to(engine.device), mask.to(engine.device))
            loss = step_gradients(engine, stack, batch, padded([final[c] for c in chosen], ids.shape[1]))
            training.step(loss, int(mask.sum()))
    finally:
        training.close()
        stack.reset()
        if was_training:
            engine.model.train()
    for a in adapters.values():
        a.frozen()
    modules = {i: adapted(given.get(i, layers[i]), adapters[i]) for i in kept}
    seconds = time.perf_counter() - t0
    result = Distillation(
        sorted(removed),
        modules,
        steps,
        batch_size,
        lr,
        seed,
        training.tokens,
        seconds,
        training.history,
        training.ema,
        rank,
        adapters,
    )
    log.info(
        "Distilled rank-%d adapters on %d kept layers for %d steps (%d tokens, %.1f s): KL %.4f -> %.4f",
        rank,
        len(kept),
        steps,
        training.tokens,
        seconds,
        result.kl_first,
        result.kl_last,
    )
    return result
