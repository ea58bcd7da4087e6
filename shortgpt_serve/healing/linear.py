"""Linear healing: one d x d map per run of removed layers, folded into the kept layer before it.

For a run of removed layers a..b, the last kept layer before it is k = a - 1. With the run gone, the state leaving
layer k goes straight on; the map T makes layer k's MLP contribution stand in for the run: it is fitted so that
the state leaving the shortened layer k, with its down-projection output x replaced by x T, matches the full
model's state leaving layer b (least squares over calibration tokens, ridge-regularised). Because x T = (Tᵀ W) h
for the down-projection W, the map folds into the weights (W ← Tᵀ W, bias ← Tᵀ b): the checkpoint keeps the
standard architecture, with fewer layers, and any engine serves it unchanged (ReplaceMe, 2025).

Unlike fitting every map on the original model's activations, the maps are fitted in order on the model as it is
being healed: the states entering layer k are the shortened model's own, earlier runs already removed and healed,
so each map also corrects the error the runs before it left. The targets are the full model's states, computed in
the same pass (the two routes share the layers before the first difference). Gram matrices are accumulated in
float64 as the pass runs; only the kept layer's outputs are held, from layer k until the pass reaches layer b.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from shortgpt_serve.errors import HealingError
from shortgpt_serve.passes import Batch, PassEngine, Route

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

TOKENS_PER_DIM = 4
"""Calibration tokens needed per hidden dimension. Each of the map's d output coordinates is a least-squares fit
with d unknowns; with N samples the in-sample error understates the out-of-sample one by about d / N of the noise,
so N ≥ 4 d keeps that optimism under a quarter (the ridge term keeps the solve stable either way)."""

DEFAULT_RIDGE = 1e-4
"""Ridge term, relative to the mean eigenvalue of the Gram matrix (trace / d)."""

OBJECTIVES = ("squared", "relative")
"""What the least squares weighs: ``squared``, every token's squared error of the state alike (ReplaceMe's least
squares), so the few tokens with very large states (the first of a sequence, mostly) dominate the fit; ``relative``,
each token's squared error divided by its target state's squared norm, so every token counts by its error
relative to its own state. The next layer normalises its input, so it reads the state's direction: the relative
error is what it sees (ReplaceMe's cosine objective, in closed form)."""

POST_NORM_FAMILIES = {"gemma2": "Gemma 2", "gemma3_text": "Gemma 3", "olmo2": "OLMo 2"}
"""Families that normalise the MLP output before it joins the residual stream: a linear map of the
down-projection output cannot be folded through that norm."""


@dataclass
class RunFit:
    """One run of removed layers and the map fitted for it."""

    kept: int
    """The kept layer the map is folded into (original index)."""
    run: list[int]
    tokens: int
    error_plain: float
    """Relative squared error of the shortened model's state against the full model's, without the map."""
    error_healed: float
    """The same with the map (on the calibration tokens it was fitted on)."""


@dataclass
class LinearHealing:
    """The fitted maps: kept layer -> T (d x d, float64, on the CPU), and how they were obtained."""

    removed: list[int]
    maps: dict[int, torch.Tensor] = field(repr=False)
    fits: list[RunFit]
    ridge: float
    tokens: int
    seconds: float
    unhealed: list[list[int]] = field(default_factory=list)
    """Runs with no kept layer before them (a run starting at layer 0): left as plain removal."""
    objective: str = "squared"

    def record(self) -> dict[str, Any]:
        """What the provenance and the report keep (no tensors)."""
        return {
            "method": "linear",
            "ridge": self.ridge,
            "objective": self.objective,
            "calibration_tokens": self.tokens,
            "seconds": round(self.seconds, 2),
            "runs": [
                {
                    "kept_layer": f.kept,
                    "removed": f.run,
                    "error_plain": round(f.error_plain, 6),
                    "error_healed": round(f.error_healed, 6),
                }
                for f in self.fits
            ],
            "unhealed_runs": self.unhealed,
        }


def runs_of(removed: Sequence[int]) -> list[list[int]]:
    """Runs of consecutive layers, in order: [3, 4, 7] -> [[3, 4], [7]]."""
    runs: list[list[int]] = []
    for i in sorted(removed):
        if runs and runs[-1][-1] == i - 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def residual_scale(config: Any) -> float:
    """How the MLP output joins the residual stream: h + c x (Granite scales it by ``residual_multiplier``)."""
    return float(getattr(config, "residual_multiplier", 1.0) or 1.0)


def check_foldable(model_type: str, config: Any, quantized: bool, moe: bool, fold: bool = True) -> None:
    """Refuse models healing cannot run on, with what to do instead: quantized or MoE weights always, and with
    ``fold`` (linear maps to fold in) families whose MLP output is normed before the residual stream."""
    if quantized:
        raise HealingError(
            "--heal needs full-precision weights to fold maps into or train; this model's weights are quantized. "
            "Use --heal none, or shorten the unquantized model and quantize the result."
        )
    if moe:
        raise HealingError(
            "--heal folds maps into and trains one MLP per layer; this model's layers are mixtures of "
            "experts. Use --heal none."
        )
    if fold and model_type in POST_NORM_FAMILIES:
        raise HealingError(
            f"--heal linear cannot fold a map through {POST_NORM_FAMILIES[model_type]}'s norm after the MLP "
            "(post-feedforward norm); use --heal none for this model."
        )


def down_proj(layer: torch.nn.Module) -> torch.nn.Linear:
    mlp = getattr(layer, "mlp", None)
    proj = getattr(mlp, "down_proj", None)
    if proj is None:
        raise HealingError(
            f"--heal linear: the decoder layer ({type(layer).__name__}) has no mlp.down_proj to fold a map into; "
            "use --heal none."
        )
    return proj


def check_tokens(tokens: int, hidden: int) -> None:
    need = TOKENS_PER_DIM * hidden
    if tokens < need:
        raise HealingError(
            f"--heal linear needs at least {need:,} calibration tokens ({TOKENS_PER_DIM} per hidden dimension, "
            f"{hidden}) to estimate its maps; the calibration has {tokens:,}. Raise --calib-tokens or give more "
            "--calibration text."
        )


def fold(layer: torch.nn.Module, t: torch.Tensor) -> None:
    """W ← Tᵀ W (and bias ← Tᵀ b) on the layer's down-projection, in place, computed in float64."""
    import torch

    proj = down_proj(layer)
    with torch.no_grad():
        tt = t.to(proj.weight.device, torch.float64).T
        proj.weight.copy_((tt @ proj.weight.double()).to(proj.weight.dtype))
        if proj.bias is not None:
            proj.bias.copy_((tt @ proj.bias.double()).to(proj.bias.dtype))


def healed_layers(engine: PassEngine, maps: dict[int, torch.Tensor]) -> dict[int, torch.nn.Module]:
    """Copies of the kept layers with their maps folded in, for a pass route's ``replace``."""
    out = {}
    for k, t in sorted(maps.items()):
        with engine.placement.layer(k) as layer:
            healed = copy.deepcopy(layer)
        fold(healed, t)
        out[k] = healed
    return out


class _Gram:
    """For the fit x T ≈ y over real tokens, each token weighted by w, accumulated in float64: XᵀWX, XᵀWY, Σw|y|²,
    Σw|y - x|² (the error without the map) and Σw|target|² (to make the errors relative)."""

    def __init__(self, d: int, objective: str = "squared") -> None:
        import torch

        self.objective = objective
        self.xx = torch.zeros(d, d, dtype=torch.float64)
        self.xy = torch.zeros(d, d, dtype=torch.float64)
        self.yy = self.plain = self.target = 0.0
        self.n = 0

    def add(self, x: torch.Tensor, y: torch.Tensor, target_sq: torch.Tensor) -> None:
        """``target_sq``: each token's squared target norm (in the units of ``y``)."""
        import torch

        x, y, target_sq = x.cpu(), y.cpu(), target_sq.cpu()
        relative = self.objective == "relative"
        w = 1.0 / target_sq.clamp_min(1e-30) if relative else torch.ones_like(target_sq)
        wx = x * w[:, None] if relative else x
        self.xx += wx.T @ x
        self.xy += wx.T @ y
        self.yy += float((w * (y * y).sum(1)).sum())
        self.plain += float((w * ((y - x) ** 2).sum(1)).sum())
        self.target += float((w * target_sq).sum())
        self.n += x.shape[0]

    def solve(self, ridge: float) -> tuple[torch.Tensor, float, float]:
        """T, and the squared error of the state relative to the target's norm, without and with T."""
        import torch

        d = self.xx.shape[0]
        lam = ridge * float(torch.trace(self.xx)) / d
        t = torch.linalg.solve(self.xx + lam * torch.eye(d, dtype=torch.float64), self.xy)
        # |Y - X T|² = |Y|² - 2 <T, XᵀY> + <T, XᵀX T>
        healed = self.yy - 2 * float((t * self.xy).sum()) + float((t * (self.xx @ t)).sum())
        norm = max(self.target, 1e-30)
        return t, self.plain / norm, max(healed, 0.0) / norm


def _fit_run(
    engine: PassEngine,
    batches: Sequence[Batch],
    kept: int,
    run: list[int],
    done: list[int],
    healed: dict[int, torch.nn.Module],
    objective: str,
    progress: bool,
) -> tuple[torch.nn.Module, _Gram]:
    """One pass: the full model to the run's end beside the shortened model (earlier runs removed and healed)
    with a copy of the kept layer that records its down-projection output; returns the copy and the Gram sums."""
    end, scale = run[-1], residual_scale(engine.model.config)
    with engine.placement.layer(kept) as layer:
        fitting = copy.deepcopy(layer)
    gram = _Gram(int(engine.model.config.hidden_size), objective)
    slot: list[torch.Tensor] = []
    held: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def at_kept(layer: int, batch: int, h_in: torch.Tensor, h_out: torch.Tensor, mask: torch.Tensor) -> None:
        if layer == kept:
            real = mask.bool()
            held[batch] = (slot.pop()[real], h_out[real])
            slot.clear()

    def at_end(layer: int, batch: int, h_in: torch.Tensor, h_out: torch.Tensor, mask: torch.Tensor) -> None:
        if layer == end:
            x, short = held.pop(batch)
            x, short = x.double(), short.double()
            target = h_out[mask.bool()].double()
            # Wanted: short + scale (x T - x) = target, so x T ≈ x + (target - short) / scale. The errors are
            # those of the state, divided by scale² on both sides of the ratio.
            gram.add(x, x + (target - short) / scale, (target * target).sum(1) / scale**2)

    routes = [
        Route(observers=[at_end]),
        Route(frozenset([*done, *run]), observers=[at_kept], replace={**healed, kept: fitting}),
    ]
    hook = down_proj(fitting).register_forward_hook(lambda _m, _a, out: slot.append(out))
    try:
        engine.run(
            batches,
            routes,
            progress=f"Fitting the map for layers {run[0]}-{end}" if progress else None,
            stop_after=end,
        )
    finally:
        hook.remove()
    return fitting, gram


def fit_linear(
    engine: PassEngine,
    batches: Sequence[Batch],
    removed: Sequence[int],
    *,
    ridge: float = DEFAULT_RIDGE,
    objective: str = "squared",
    progress: bool = True,
) -> LinearHealing:
    """Fit the maps for ``removed`` in order, one pass over ``batches`` (calibration text) per run of layers,
    minimising the :data:`OBJECTIVES` ``objective``."""
    if objective not in OBJECTIVES:
        raise HealingError(f"heal.objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}.")
    t0 = time.perf_counter()
    config = engine.model.config
    tokens = sum(int(b.attention_mask.sum()) for b in batches)
    hidden = int(config.hidden_size)
    check_tokens(tokens, hidden)
    maps: dict[int, torch.Tensor] = {}
    healed: dict[int, torch.nn.Module] = {}
    fits: list[RunFit] = []
    unhealed: list[list[int]] = []
    done: list[int] = []
    for run in runs_of(removed):
        kept = run[0] - 1
        if kept < 0:
            unhealed.append(run)
            done += run
            continue
        fitting, gram = _fit_run(engine, batches, kept, run, done, healed, objective, progress)
        t, plain, after = gram.solve(ridge)
        fold(fitting, t)
        maps[kept], healed[kept] = t, fitting
        fits.append(RunFit(kept, run, gram.n, plain, after))
        log.info(
            "Layers %s: map folded into layer %d; relative error %.4f -> %.4f on %d calibration tokens",
            run,
            kept,
            plain,
            after,
            gram.n,
        )
        done += run
    return LinearHealing(
        sorted(removed), maps, fits, ridge, tokens, time.perf_counter() - t0, unhealed, objective=objective
    )
