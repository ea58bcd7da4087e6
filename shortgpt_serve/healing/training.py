"""The optimisation both distillations share (:mod:`~shortgpt_serve.healing.distill` trains the kept layers,
:mod:`~shortgpt_serve.healing.layerwise` low-rank adapters): AdamW without weight decay, a linear warm-up over the
first 5% of the steps then cosine decay, the gradient norm clipped at 1.0, and the loss of every step with its
running average, shown in the progress bar."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

WARMUP_FRACTION = 0.05
"""Share of the steps over which the learning rate rises linearly to its peak."""
CLIP_NORM = 1.0
"""Gradient norm clipping."""
EMA_DECAY = 0.9
"""Smoothing of the running KL shown in the progress bar."""


def schedule(steps: int) -> Callable[[int], float]:
    """Learning-rate factor per step: linear warm-up over the first 5% of the steps, then cosine decay."""
    warmup = max(1, round(WARMUP_FRACTION * steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    return factor


class Training:
    """AdamW over ``params`` for ``steps`` steps, the losses so far and the progress bar; :meth:`close` when done."""

    def __init__(self, params: Iterable[torch.Tensor], *, lr: float, steps: int, desc: str, progress: bool):
        import torch
        from tqdm.auto import tqdm

        self.params = list(params)
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=0.0)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule(steps))
        self.history: list[float] = []
        """The loss of each step, before that step's update."""
        self.ema = 0.0
        self.tokens = 0
        self._bar = tqdm(total=steps, desc=desc, unit="step", disable=not progress, leave=False)

    def step(self, loss: torch.Tensor, tokens: int) -> None:
        """Clip the gradients set on the parameters, step, clear them, and record ``loss`` (over ``tokens``)."""
        import torch

        torch.nn.utils.clip_grad_norm_(self.params, CLIP_NORM)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        value = float(loss.detach())
        self.history.append(value)
        self.ema = value if len(self.history) == 1 else EMA_DECAY * self.ema + (1 - EMA_DECAY) * value
        self.tokens += tokens
        self._bar.set_postfix(kl=f"{self.ema:.4f}")
        self._bar.update()

    def close(self) -> None:
        self._bar.close()
        self.optimizer.zero_grad(set_to_none=True)
