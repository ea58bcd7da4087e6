"""Block Influence profiling (ShortGPT, Men et al. 2024).

    BI_i = 1 - mean over real tokens t of cos(x_{i,t}, x_{i+1,t})

where x_i is the hidden state entering decoder layer i and x_{i+1} the one leaving it. Forward hooks read each
layer's own input and output (the last layer's output is taken before the final norm), cosines are computed
row-wise per token in float32 and summed as the forward pass goes: no token-by-token matrices and no stored
activations.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

    from shortgpt_serve.families import Family


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


@contextlib.contextmanager
def layer_hooks(layers: Iterable[torch.nn.Module], make_hook: Callable[[int], Callable[..., None]]) -> Iterator[None]:
    """Forward hooks (with kwargs) on each decoder layer for the duration of the block, removed even on error."""
    handles = [layer.register_forward_hook(make_hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def profile_layers(
    model: PreTrainedModel,
    family: Family,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    total_batches: int | None = None,
    progress: bool = True,
    on_batch: Callable[[int], None] | None = None,
) -> tuple[list[float], int]:
    """Run the model over calibration batches and return (BI per layer, tokens counted).

    ``batches`` yields (input_ids, attention_mask) on the model's device.
    """
    import torch
    from tqdm.auto import tqdm

    from shortgpt_serve.layers import decoder_layers

    layers = decoder_layers(model, family)
    sums = [0.0] * len(layers)
    counts = [0] * len(layers)
    current: dict[str, torch.Tensor] = {}

    def make_hook(idx: int) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            h_in = args[0] if args else kwargs["hidden_states"]
            h_out = output[0] if isinstance(output, tuple | list) else output
            s, c = block_influence_sums(h_in, h_out, current["mask"])
            sums[idx] += s
            counts[idx] += c

        return hook

    tokens = 0
    with (
        layer_hooks(layers, make_hook),
        torch.inference_mode(),
        tqdm(total=total_batches, desc="Profiling Block Influence", unit="batch", disable=not progress) as bar,
    ):
        for ids, mask in batches:
            current["mask"] = mask
            model(input_ids=ids, attention_mask=mask, use_cache=False)
            n = int(mask.sum())
            tokens += n
            bar.update(1)
            bar.set_postfix(tokens=tokens)
            if on_batch is not None:
                on_batch(n)
    if tokens == 0:
        raise ValueError("no calibration tokens were profiled")
    return [1.0 - s / c for s, c in zip(sums, counts, strict=True)], tokens


def profile_model(
    model: PreTrainedModel,
    family: Family,
    calibration: Any,
    *,
    batch_size: int,
    model_sha256: str = "",
    progress: bool = True,
) -> LayerProfile:
    """Profile a loaded model on a :class:`~shortgpt_serve.calibration.CalibrationSet`."""
    from shortgpt_serve.calibration import batches

    device = next(model.parameters()).device
    pad = getattr(model.config, "pad_token_id", None) or 0
    n_batches = -(-len(calibration.sequences) // batch_size)
    start = time.perf_counter()
    bi, tokens = profile_layers(
        model,
        family,
        batches(calibration.sequences, batch_size, int(pad), str(device)),
        total_batches=n_batches,
        progress=progress,
    )
    return LayerProfile(
        bi=bi,
        num_tokens=tokens,
        num_sequences=len(calibration.sequences),
        seq_len=calibration.seq_len,
        calibration_source=calibration.source,
        calibration_sha256=calibration.documents_sha256,
        model_sha256=model_sha256,
        seconds=round(time.perf_counter() - start, 3),
    )


def angular_distances(
    model: PreTrainedModel,
    family: Family,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    total_batches: int | None = None,
    progress: bool = True,
) -> list[list[float]]:
    """Mean angular distance ``arccos(cos(x_i, x_j)) / pi`` between every pair of layer boundaries i < j.

    Boundary i is the hidden state entering layer i (boundary L: leaving the last layer, before the final norm).
    Gromov et al. remove the block of n layers starting where ``d[l][l + n]`` is smallest. They average over
    each sequence's final token; we average over every real token, which gives far more samples per pair.
    Costs one forward pass; boundary states of one batch are held at a time.
    """
    import torch
    from tqdm.auto import tqdm

    from shortgpt_serve.layers import decoder_layers

    layers = decoder_layers(model, family)
    n = len(layers)
    states: dict[int, torch.Tensor] = {}
    current: dict[str, torch.Tensor] = {}

    def make_hook(idx: int) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            keep = current["mask"].bool()
            h_in = args[0] if args else kwargs["hidden_states"]
            states[idx] = torch.nn.functional.normalize(h_in[keep].float(), dim=-1)
            if idx == n - 1:
                h_out = output[0] if isinstance(output, tuple | list) else output
                states[n] = torch.nn.functional.normalize(h_out[keep].float(), dim=-1)

        return hook

    sums = torch.zeros(n + 1, n + 1, dtype=torch.float64)
    count = 0
    with (
        layer_hooks(layers, make_hook),
        torch.inference_mode(),
        tqdm(total=total_batches, desc="Profiling angular distances", unit="batch", disable=not progress) as bar,
    ):
        for ids, mask in batches:
            current["mask"] = mask
            model(input_ids=ids, attention_mask=mask, use_cache=False)
            stacked = torch.stack([states[i] for i in range(n + 1)])  # [n+1, tokens, hidden]
            cos = torch.einsum("ith,jth->ijt", stacked, stacked).clamp(-1.0, 1.0)
            sums += (torch.arccos(cos) / torch.pi).sum(-1, dtype=torch.float64).cpu()
            count += stacked.shape[1]
            states.clear()
            bar.update(1)
    if count == 0:
        raise ValueError("no calibration tokens were profiled")
    result: list[list[float]] = (sums / count).tolist()
    return result
