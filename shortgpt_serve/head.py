"""The causal LM's head on states a pass computed: the model's own forward with its base model swapped out.

The final norm has already run; the base model (embeddings, decoder layers, norm) is replaced for one call by a
stand-in that returns the normed state, so the causal LM's own code turns it into logits (logit soft-capping or
scaling, where a family has them, apply).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from shortgpt_serve.passes import Batch


def accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    """Whether the causal LM's forward can compute logits for the last positions only."""
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


@contextmanager
def base_replaced(parent: Any, name: str, normed: torch.Tensor) -> Iterator[None]:
    """While held: ``parent.<name>`` (the base model) returns ``normed`` as its last hidden state."""
    import torch

    class Output:
        """The base model's output as the causal-LM forward reads it: the last hidden state, and nothing for what a
        pass does not compute (router logits, caches, attentions)."""

        last_hidden_state = normed

        def __getattr__(self, attr: str) -> None:
            if attr.startswith("__"):
                raise AttributeError(attr)
            return None

        def __getitem__(self, index: int) -> torch.Tensor:
            if index != 0:
                raise IndexError(index)
            return normed

    class Given(torch.nn.Module):
        """Stands in for the base model: its output is the already-normed last hidden state."""

        def forward(self, *args: Any, **kwargs: Any) -> Output:
            return Output()

    base = getattr(parent, name)
    setattr(parent, name, Given())
    try:
        yield
    finally:
        setattr(parent, name, base)


def head_logits(
    model: torch.nn.Module, parent: Any, name: str, normed: torch.Tensor, batch: Batch, logits_to_keep: int
) -> torch.Tensor:
    """The causal LM's logits for ``batch`` from its normed last hidden state (``logits_to_keep``: the last N
    positions only; 0: all)."""
    kwargs: dict[str, Any] = {"logits_to_keep": logits_to_keep} if logits_to_keep else {}
    device = normed.device
    with base_replaced(parent, name, normed):
        out = model(
            input_ids=batch.input_ids.to(device),
            attention_mask=batch.attention_mask.to(device),
            use_cache=False,
            **kwargs,
        )
    logits: torch.Tensor = out.logits
    return logits
