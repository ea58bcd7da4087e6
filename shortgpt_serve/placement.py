"""Where a pass finds a model's weights: the one interface the pass engine asks for modules through.

A placement brings the modules before the decoder layers (embeddings, rotary tables), each decoder layer, and
the final norm to the pass's device when the pass reaches them, and may send them away after. :class:`Resident`
keeps a model that is already loaded on one device; placements that stream each layer's weights from the
safetensors shards, or spread the layers over several GPUs, implement the same three context managers.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import TYPE_CHECKING, Protocol

from shortgpt_serve.models.layers import decoder_layers

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

    from shortgpt_serve.models.families import Family


class Placement(Protocol):
    device: torch.device
    """Where the pass computes: batches and hidden states live here."""

    def embedding(self) -> AbstractContextManager[None]:
        """While held: everything the base model runs before its decoder layers is usable on ``device``."""
        ...

    def layer(self, index: int) -> AbstractContextManager[torch.nn.Module]:
        """While held: decoder layer ``index``, ready on ``device``."""
        ...

    def head(self) -> AbstractContextManager[torch.nn.Module]:
        """While held: the final norm (returned) and the LM head are usable on ``device``."""
        ...

    def free_bytes(self) -> int | None:
        """Memory free on ``device`` for the pass's hidden states (None: unknown, no limit applied)."""
        ...

    def settle(self) -> None:
        """Called after each batch's step through a layer or the head: what the step freed may be given back."""
        ...


def free_bytes(device: torch.device) -> int | None:
    """Free memory of a device: the GPU's free memory, or the machine's available memory for the CPU."""
    import torch

    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type == "cpu":
        import psutil

        return int(psutil.virtual_memory().available)
    return None


def final_norm(model: PreTrainedModel, family: Family) -> torch.nn.Module:
    """The norm applied to the state leaving the last decoder layer (``norm`` beside the layers)."""
    obj = model
    for part in family.layers_module.split(".")[:-1]:
        obj = getattr(obj, part)
    norm: torch.nn.Module = getattr(obj, "norm")  # noqa: B009 (mypy types getattr with a literal loosely)
    return norm


class Resident:
    """Every weight already on one device (the model as loaded); nothing moves."""

    def __init__(self, model: PreTrainedModel, family: Family) -> None:
        self.model, self.family = model, family
        self.device = next(model.parameters()).device
        self._layers = decoder_layers(model, family)
        self._norm = final_norm(model, family)

    @contextmanager
    def embedding(self) -> Iterator[None]:
        yield

    @contextmanager
    def layer(self, index: int) -> Iterator[torch.nn.Module]:
        yield self._layers[index]

    @contextmanager
    def head(self) -> Iterator[torch.nn.Module]:
        yield self._norm

    def free_bytes(self) -> int | None:
        return free_bytes(self.device)

    def settle(self) -> None:
        pass
