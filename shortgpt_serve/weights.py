"""Safetensors primitives: which file holds which tensor, tensor shapes, layer-key renaming.

Reads headers only; nothing here loads a whole model.
"""

from __future__ import annotations

import json
import re
from math import prod
from pathlib import Path

from shortgpt_serve.errors import ModelError

INDEX_NAME = "model.safetensors.index.json"


def weight_map(folder: Path) -> dict[str, str]:
    """Tensor name -> shard file name, from the index if there is one, else from the single shard's header."""
    from safetensors import safe_open

    index = folder / INDEX_NAME
    if index.is_file():
        try:
            mapping = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise ModelError(f"{index} is not a valid safetensors index ({exc}).") from exc
        missing = sorted({f for f in mapping.values() if not (folder / f).is_file()})
        if missing:
            raise ModelError(f"{index} names missing shard(s) {', '.join(missing)}; the checkpoint is incomplete.")
        return dict(mapping)
    shards = sorted(folder.glob("*.safetensors"))
    if len(shards) != 1:
        raise ModelError(
            f"{folder} has {len(shards)} safetensors files and no {INDEX_NAME}; keep exactly one file or add the index."
        )
    try:
        with safe_open(shards[0], framework="pt") as f:
            return {name: shards[0].name for name in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except Exception as exc:
        raise ModelError(f"{shards[0]} is not a readable safetensors file ({exc}); the checkpoint is damaged.") from exc


def tensor_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    by_file: dict[str, list[str]] = {}
    for name, file in weight_map(folder).items():
        by_file.setdefault(file, []).append(name)
    for file, names in by_file.items():
        with safe_open(folder / file, framework="pt") as f:
            for name in names:
                shapes[name] = tuple(f.get_slice(name).get_shape())
    return shapes


def layer_pattern(prefix: str) -> re.Pattern[str]:
    """Matches ``<prefix>.<i>.<rest>`` and captures i and rest."""
    return re.compile(rf"^{re.escape(prefix)}\.(\d+)\.(.+)$")


def layer_of(name: str, pattern: re.Pattern[str]) -> int | None:
    m = pattern.match(name)
    return int(m.group(1)) if m else None


def params_by_layer(shapes: dict[str, tuple[int, ...]], prefix: str, num_layers: int) -> tuple[list[int], int]:
    """Parameters in each decoder layer, and outside all layers (embeddings, head, final norm)."""
    pattern = layer_pattern(prefix)
    per_layer = [0] * num_layers
    other = 0
    for name, shape in shapes.items():
        i = layer_of(name, pattern)
        if i is None:
            other += prod(shape)
        elif i >= num_layers:
            raise ModelError(
                f"weight {name} belongs to layer {i}, but config.json says num_hidden_layers={num_layers}; "
                "the config and the weights disagree."
            )
        else:
            per_layer[i] += prod(shape)
    return per_layer, other


def check_layer_count(names: list[str], prefix: str, num_layers: int, where: str) -> None:
    """The weights hold exactly layers 0..num_layers-1, as config.json says."""
    pattern = layer_pattern(prefix)
    found = {i for i in (layer_of(n, pattern) for n in names) if i is not None}
    if found != set(range(num_layers)):
        raise ModelError(
            f"{where}: config.json says num_hidden_layers={num_layers} but the weights hold layers "
            f"{min(found, default=0)}..{max(found, default=-1)} ({len(found)} of them); the config and the weights "
            "disagree. Fix config.json or use the matching weights."
        )


def check_readable(folder: Path, mapping: dict[str, str]) -> None:
    """Every shard's header parses and its data is as long as the header says (catches truncated files)."""
    import json
    import struct

    for shard in sorted(set(mapping.values())):
        path = folder / shard
        size = path.stat().st_size
        try:
            with open(path, "rb") as f:
                (header_len,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(header_len)) if 8 + header_len <= size else None
        except (struct.error, ValueError, UnicodeDecodeError):
            header = None
        if not isinstance(header, dict):
            raise ModelError(f"{path} is not a readable safetensors file; the checkpoint is damaged.")
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + header_len + end != size:
            raise ModelError(
                f"{path} is {size} bytes but its header describes {8 + header_len + end}; the checkpoint is "
                "damaged (truncated or padded). Download or copy it again."
            )
