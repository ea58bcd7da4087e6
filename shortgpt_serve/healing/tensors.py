"""The healed tensors as the checkpoint writer stores them: the source's down-projections with the maps folded in.

Computed from the source's own safetensors data (not from the evaluation copy, which may run in another dtype), in
float64, and stored in the source tensor's dtype and shape, so the checkpoint differs from plain removal only in
those tensors' bytes.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from shortgpt_serve.errors import HealingError
from shortgpt_serve.models.weights import weight_map

if TYPE_CHECKING:
    import torch

DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


def folded_tensors(folder: Path, layers_module: str, maps: dict[int, torch.Tensor]) -> dict[str, bytes]:
    """Source tensor name -> new raw data, for each kept layer's ``mlp.down_proj`` weight (and bias)."""
    import torch
    from safetensors import safe_open

    mapping = weight_map(folder)
    out: dict[str, bytes] = {}
    for k, t in sorted(maps.items()):
        tt = t.to(torch.float64).T
        for part in ("weight", "bias"):
            name = f"{layers_module}.{k}.mlp.down_proj.{part}"
            if name not in mapping:
                if part == "weight":
                    raise HealingError(
                        f"the model's weights have no {name} to fold the map into; use --heal none for this model."
                    )
                continue
            with safe_open(str(folder / mapping[name]), framework="pt") as f:
                w = f.get_tensor(name)
            if str(w.dtype).removeprefix("torch.") not in DTYPES.values():
                raise HealingError(f"{name} is stored as {w.dtype}; --heal linear folds into float weights only.")
            new = (tt @ w.to(torch.float64)).to(w.dtype).contiguous()
            out[name] = new.view(torch.uint8).numpy().tobytes()  # raw little-endian bytes, bfloat16 included
    return out


def layer_tensors(folder: Path, layers_module: str, layers: dict[int, torch.nn.Module]) -> dict[str, bytes]:
    """Source tensor name -> new raw data for every weight of each given decoder layer (original index -> trained
    module), in the source tensor's dtype; the layer's other state (rotary tables, buffers not in the weights) is
    left out."""
    import torch

    from shortgpt_serve.models.weights import read_header

    mapping = weight_map(folder)
    headers: dict[str, dict[str, object]] = {}
    out: dict[str, bytes] = {}
    for i, module in sorted(layers.items()):
        for key, value in module.state_dict().items():
            name = f"{layers_module}.{i}.{key}"
            if name not in mapping:
                continue
            shard = mapping[name]
            if shard not in headers:
                headers[shard] = read_header(folder / shard)[0]
            info = headers[shard][name]
            assert isinstance(info, dict)
            dtype = DTYPES.get(str(info["dtype"]))
            if dtype is None or list(value.shape) != list(info["shape"]):
                raise HealingError(
                    f"{name} is stored as {info['dtype']} {info['shape']}; the healed layer cannot be written over it."
                )
            new = value.detach().to("cpu", getattr(torch, dtype)).contiguous()
            out[name] = new.view(torch.uint8).numpy().tobytes()
    return out
