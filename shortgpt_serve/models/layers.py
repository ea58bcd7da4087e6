"""A loaded model's decoder layers: find them, and run the model without some of them.

:func:`skipped_layers` removes layers in place and reversibly (the full model and its candidates are compared
without loading the weights twice); :func:`remove_layers_in_memory` removes them for good, the in-memory
reference a written checkpoint must match. Both cut the same way: the layers' ModuleList is swapped for one
holding only the kept layers (the same modules, no copies), kept layers are renumbered (``layer_idx``), and
per-layer config entries and the layer count are cut (:func:`shortgpt_serve.models.families.shortened_config`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from shortgpt_serve.errors import ModelError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

    from shortgpt_serve.models.families import Family


def decoder_layers(model: torch.nn.Module, family: Family) -> torch.nn.ModuleList:
    """The model's ModuleList of decoder layers (``family.layers_module``)."""
    obj: Any = model
    for part in family.layers_module.split("."):
        obj = getattr(obj, part)
    return obj


def _cut(model: PreTrainedModel, family: Family, removed: Iterable[int]) -> list[Callable[[], None]]:
    """Remove decoder layers ``removed`` in place; returns the actions that undo it, in the order they were done.

    On an error part way, what was done is undone before the error propagates.
    """
    import torch

    from shortgpt_serve.models.families import shortened_config

    layers = decoder_layers(model, family)
    drop = set(removed)
    bad = sorted(i for i in drop if not 0 <= i < len(layers))
    if bad:
        raise ModelError(f"layers {bad} do not exist; the model has decoder layers 0..{len(layers) - 1}.")
    keep = [layer for i, layer in enumerate(layers) if i not in drop]
    *path, last = family.layers_module.split(".")
    parent: Any = model
    for part in path:
        parent = getattr(parent, part)
    config = model.config
    old_cfg = config.to_dict()
    old_cfg.setdefault("num_hidden_layers", len(layers))
    new_cfg = shortened_config(old_cfg, sorted(drop))
    changed = [k for k in new_cfg if hasattr(config, k) and new_cfg[k] != old_cfg.get(k)]
    # num_hidden_layers first: the model runs self.layers[: config.num_hidden_layers].
    changed.sort(key=lambda k: k != "num_hidden_layers")

    undo: list[Callable[[], None]] = []
    try:
        for key in changed:
            undo.append(functools.partial(setattr, config, key, getattr(config, key)))
            setattr(config, key, new_cfg[key])
        for new_idx, layer in enumerate(keep):
            for module in layer.modules():
                if hasattr(module, "layer_idx"):
                    undo.append(functools.partial(setattr, module, "layer_idx", module.layer_idx))
                    setattr(module, "layer_idx", new_idx)  # noqa: B010 (a tensor-typed attribute to mypy)
        setattr(parent, last, torch.nn.ModuleList(keep))
        undo.append(functools.partial(setattr, parent, last, layers))
    except BaseException:
        for action in reversed(undo):
            action()
        raise
    return undo


@contextmanager
def skipped_layers(model: PreTrainedModel, family: Family, removed: Iterable[int]) -> Iterator[None]:
    """Run the loaded model without decoder layers ``removed`` inside the block; restore it exactly on exit."""
    undo = _cut(model, family, removed)
    try:
        yield
    finally:
        for action in reversed(undo):
            action()


def remove_layers_in_memory(model: PreTrainedModel, family: Family, removed: Iterable[int]) -> None:
    """Delete decoder layers from a loaded model in place, for good."""
    _cut(model, family, removed)
