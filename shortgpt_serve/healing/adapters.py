"""Low-rank adapters on a decoder layer's linear projections: trained by distillation, merged into the weights.

Every ``nn.Linear`` inside a kept decoder layer (attention and MLP projections) gets a low-rank term beside it,
y = W x + b + B (A x), A [rank, in] and B [out, rank] in float32 (LoRA, Hu et al. 2021): A starts random with
variance 1 / in, B at zero, so training starts from the layer as it was. The adapters live apart from the layer:
they are attached (forward hooks) only while :class:`Adapted` runs it, so the same adapters serve the layer
whether its weights stay on the device or are brought in by a streamed placement for each pass.

For the checkpoint the term is merged into the weight, W' = W + B A, computed from the source's own tensor in
float64 and stored in its dtype and shape (:class:`MergedTensors`, one tensor at a time when the writer asks for
it); the checkpoint keeps the standard architecture and vLLM serves it unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shortgpt_serve.errors import HealingError

if TYPE_CHECKING:
    import torch


def linear_names(layer: torch.nn.Module) -> list[str]:
    """The names (inside the layer) of its linear projections, in module order."""
    import torch

    return [name for name, m in layer.named_modules() if isinstance(m, torch.nn.Linear)]


class LayerAdapters:
    """One decoder layer's adapters: per linear projection (by name inside the layer) its A and B."""

    def __init__(self, layer: torch.nn.Module, rank: int, device: torch.device, generator: torch.Generator) -> None:
        import torch

        if rank < 1:
            raise ValueError(f"an adapter's rank must be >= 1, got {rank}.")
        self.rank = rank
        self.a: dict[str, torch.Tensor] = {}
        self.b: dict[str, torch.Tensor] = {}
        for name in linear_names(layer):
            m = layer.get_submodule(name)
            assert isinstance(m, torch.nn.Linear)
            a = torch.randn(rank, m.in_features, generator=generator, dtype=torch.float32) / m.in_features**0.5
            self.a[name] = a.to(device).requires_grad_(True)
            self.b[name] = torch.zeros(m.out_features, rank, dtype=torch.float32, device=device, requires_grad=True)
        if not self.a:
            raise HealingError("this model's decoder layers have no linear projections to adapt; use --heal linear.")

    def parameters(self) -> list[torch.Tensor]:
        return [t for name in self.a for t in (self.a[name], self.b[name])]

    def delta(self, name: str) -> torch.Tensor:
        """B A for the projection ``name`` ([out, in], float64, on the CPU): what merging adds to its weight."""
        import torch

        with torch.no_grad():
            return (self.b[name].double() @ self.a[name].double()).cpu()

    def frozen(self) -> LayerAdapters:
        """These adapters with training ended: no gradients kept or taken."""
        for t in self.parameters():
            t.grad = None
            t.requires_grad_(False)
        return self

    @contextmanager
    def attached(self, layer: torch.nn.Module) -> Iterator[None]:
        """While held, ``layer``'s projections add their low-rank terms (in float32, cast to their output's dtype)."""
        handles = []
        for name in self.a:
            a, b = self.a[name], self.b[name]

            def hook(module: Any, args: tuple[Any, ...], out: torch.Tensor, a: Any = a, b: Any = b) -> torch.Tensor:
                return out + ((args[0].to(a.dtype) @ a.T) @ b.T).to(out.dtype)

            handles.append(layer.get_submodule(name).register_forward_hook(hook))
        try:
            yield
        finally:
            for h in handles:
                h.remove()


def adapted(layer: torch.nn.Module, adapters: LayerAdapters) -> torch.nn.Module:
    """``layer`` run with ``adapters`` attached, for a pass route's ``replace``: the module object is the one a
    placement brings its weights into, so it runs with whatever weights the layer holds when called; attributes
    the model reads off its layers (``attention_type``) are the layer's."""
    import torch

    class Adapted(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            object.__setattr__(self, "layer", layer)
            object.__setattr__(self, "adapters", adapters)

        def __getattr__(self, name: str) -> Any:
            try:
                return super().__getattr__(name)
            except AttributeError:
                return getattr(object.__getattribute__(self, "layer"), name)

        def forward(self, *args: Any, **kwargs: Any) -> Any:
            with adapters.attached(layer):
                return layer(*args, **kwargs)

    return Adapted()


class MergedTensors(Mapping[str, bytes]):
    """Source tensor name -> new raw data for each adapted projection's weight, W + B A (on ``bases``' data where
    given: a down-projection with a linear map already folded in), computed when the writer asks for it."""

    def __init__(
        self,
        folder: Path,
        layers_module: str,
        adapters: Mapping[int, LayerAdapters],
        bases: Mapping[str, bytes] | None = None,
    ) -> None:
        from shortgpt_serve.models.weights import weight_map

        self._folder, self._bases = folder, dict(bases or {})
        self._mapping = weight_map(folder)
        self._of: dict[str, tuple[int, str]] = {}
        for i, layer_adapters in adapters.items():
            for name in layer_adapters.a:
                key = f"{layers_module}.{i}.{name}.weight"
                if key not in self._mapping:
                    raise HealingError(f"the model's weights have no {key} to merge the adapter into.")
                self._of[key] = (i, name)
        self._adapters = dict(adapters)
        for key in self._bases:
            if key not in self._of:
                self._of[key] = (-1, "")  # a folded map with no adapter on its projection

    def __iter__(self) -> Iterator[str]:
        return iter(self._of)

    def __len__(self) -> int:
        return len(self._of)

    def __getitem__(self, key: str) -> bytes:
        import torch
        from safetensors import safe_open

        from shortgpt_serve.healing.tensors import DTYPES

        i, name = self._of[key]
        with safe_open(str(self._folder / self._mapping[key]), framework="pt") as f:
            w = f.get_tensor(key)
        if str(w.dtype).removeprefix("torch.") not in DTYPES.values():
            raise HealingError(f"{key} is stored as {w.dtype}; adapters merge into float weights only.")
        base = self._bases.get(key)
        if base is not None:
            if i < 0:
                return base
            w = torch.frombuffer(bytearray(base), dtype=torch.uint8).view(w.dtype).view(w.shape)
        new = (w.to(torch.float64) + self._adapters[i].delta(name)).to(w.dtype).contiguous()
        return new.view(torch.uint8).numpy().tobytes()
