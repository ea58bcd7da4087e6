"""Linear healing: the maps against an independent least-squares reference, fitted in order on the healed model."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from shortgpt_serve.errors import HealingError
from shortgpt_serve.healing.linear import (
    DEFAULT_RIDGE,
    check_foldable,
    check_tokens,
    fit_linear,
    fold,
    healed_layers,
    runs_of,
)
from shortgpt_serve.models.families import FAMILIES
from shortgpt_serve.models.layers import decoder_layers, skipped_layers
from shortgpt_serve.passes import Batch, PassEngine, Route
from tests.conftest import padded_calibration as calibration
from tests.conftest import tiny_config


def tiny(model_type: str = "llama", **overrides: Any) -> Any:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides)).eval().double()


def reference_map(
    model: Any,
    short_model: Any,
    batches: list[Batch],
    kept: int,
    end: int,
    removed_before: list[int],
    objective: str = "squared",
) -> torch.Tensor:
    """T by ridge least squares from plain forwards: ``short_model`` (a copy with earlier maps folded in) with
    ``removed_before`` and kept+1..end deleted gives x (layer ``kept``'s down-projection output) and its state
    leaving ``kept``; the full ``model`` gives the target leaving ``end``. ``relative``: each token's row scaled
    by 1 / |its target| before an ordinary least squares."""
    family = FAMILIES["llama"]
    xs, ys, ws = [], [], []
    for b in batches:
        real = b.attention_mask.bool()
        with torch.no_grad():
            full = model(input_ids=b.input_ids, attention_mask=b.attention_mask, output_hidden_states=True)
        target = full.hidden_states[end + 1][real]
        got: list[torch.Tensor] = []
        proj = decoder_layers(short_model, family)[kept].mlp.down_proj
        handle = proj.register_forward_hook(lambda _m, _a, out, got=got: got.append(out))
        gone = [*removed_before, *range(kept + 1, end + 1)]
        try:
            with skipped_layers(short_model, family, gone), torch.no_grad():
                out = short_model(input_ids=b.input_ids, attention_mask=b.attention_mask, output_hidden_states=True)
        finally:
            handle.remove()
        position = kept + 1 - sum(1 for i in removed_before if i < kept)
        short = out.hidden_states[position][real]
        x = got[0][real]
        xs.append(x)
        ys.append(x + target - short)
        ws.append(1.0 / target.norm(dim=1) if objective == "relative" else torch.ones(len(x), dtype=x.dtype))
    w = torch.cat(ws)[:, None]
    x, y = torch.cat(xs) * w, torch.cat(ys) * w
    gram = x.T @ x
    lam = DEFAULT_RIDGE * float(torch.trace(gram)) / gram.shape[0]
    return torch.linalg.solve(gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype), x.T @ y)


def test_runs_of_consecutive_layers() -> None:
    assert runs_of([7, 3, 4, 10, 11, 12]) == [[3, 4], [7], [10, 11, 12]]
    assert runs_of([]) == []


@pytest.mark.parametrize("objective", ["squared", "relative"])
def test_maps_match_a_least_squares_reference_fitted_in_order(objective: str) -> None:
    """Two runs, [2] healed into layer 1 and [4] into layer 3, the second fitted on the model with the first run
    removed and its map folded in."""
    model = tiny()
    engine = PassEngine.of(model)
    batches = calibration()
    healing = fit_linear(engine, batches, [2, 4], objective=objective, progress=False)
    assert sorted(healing.maps) == [1, 3]
    assert healing.record()["objective"] == objective
    short = copy.deepcopy(model)
    want_first = reference_map(model, short, batches, kept=1, end=2, removed_before=[], objective=objective)
    assert torch.allclose(healing.maps[1], want_first, atol=1e-8, rtol=1e-6)
    fold(decoder_layers(short, FAMILIES["llama"])[1], want_first)
    want_second = reference_map(model, short, batches, kept=3, end=4, removed_before=[2], objective=objective)
    assert torch.allclose(healing.maps[3], want_second, atol=1e-8, rtol=1e-6)
    for fit in healing.fits:
        assert fit.error_healed < fit.error_plain
    if objective == "relative":
        other = fit_linear(engine, batches, [2, 4], progress=False)
        assert not torch.allclose(healing.maps[1], other.maps[1], atol=1e-6)  # the weighting changes the fit
        return
    assert healing.record()["runs"][0] == {
        "kept_layer": 1,
        "removed": [2],
        "error_plain": round(healing.fits[0].error_plain, 6),
        "error_healed": round(healing.fits[0].error_healed, 6),
    }


def test_healing_brings_the_logits_closer_to_the_full_model() -> None:
    """On the calibration text, the healed route's logits are closer to the full model's than plain removal's."""
    model = tiny()
    engine = PassEngine.of(model)
    batches = calibration()
    removed = frozenset({2, 3})
    healing = fit_linear(engine, batches, sorted(removed), progress=False)
    got: dict[str, list[torch.Tensor]] = {"full": [], "plain": [], "healed": []}
    routes = [
        Route(on_logits=lambda b, x: got["full"].append(x[batches[b].attention_mask.bool()])),
        Route(removed, on_logits=lambda b, x: got["plain"].append(x[batches[b].attention_mask.bool()])),
        Route(
            removed,
            on_logits=lambda b, x: got["healed"].append(x[batches[b].attention_mask.bool()]),
            replace=healed_layers(engine, healing.maps),
        ),
    ]
    engine.run(batches, routes)
    full = torch.cat(got["full"])
    plain = (torch.cat(got["plain"]) - full).norm()
    healed = (torch.cat(got["healed"]) - full).norm()
    assert healed < plain


def test_a_run_at_the_first_layer_stays_plain() -> None:
    model = tiny()
    healing = fit_linear(PassEngine.of(model), calibration(), [0, 1, 4], progress=False)
    assert healing.unhealed == [[0, 1]] and sorted(healing.maps) == [3]


def test_granite_scales_the_residual() -> None:
    """Granite adds the MLP output times residual_multiplier: the fit accounts for it (reference: the healed
    copy's state error drops as for llama)."""
    model = tiny("granite", residual_multiplier=0.5)
    healing = fit_linear(PassEngine.of(model), calibration(), [2], progress=False)
    assert healing.fits[0].error_healed < healing.fits[0].error_plain


@pytest.mark.parametrize(
    ("model_type", "quantized", "moe", "match"),
    [
        ("gemma2", False, False, "Gemma 2's norm after the MLP"),
        ("olmo2", False, False, "OLMo 2's norm after the MLP"),
        ("llama", True, False, "quantized"),
        ("mixtral", False, True, "mixtures of experts"),
    ],
)
def test_models_it_cannot_fold_into_are_refused(model_type: str, quantized: bool, moe: bool, match: str) -> None:
    with pytest.raises(HealingError, match=match):
        check_foldable(model_type, None, quantized=quantized, moe=moe)


def test_an_unknown_objective_is_refused() -> None:
    with pytest.raises(HealingError, match=r"heal\.objective must be one of squared, relative, got 'cosine'"):
        fit_linear(PassEngine.of(tiny()), calibration(), [2], objective="cosine", progress=False)


def test_too_little_calibration_text_is_refused() -> None:
    with pytest.raises(HealingError, match="needs at least 2,304 calibration tokens"):
        check_tokens(1000, 576)
    model = tiny()
    short = [Batch(torch.ones(1, 20, dtype=torch.long), torch.ones(1, 20, dtype=torch.long))]
    with pytest.raises(HealingError, match="needs at least 128 calibration tokens"):
        fit_linear(PassEngine.of(model), short, [2], progress=False)


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "phi3", "granite"])
@pytest.mark.parametrize("shard", [None, 20_000])
def test_the_written_checkpoint_is_the_healed_model(
    model_type: str, shard: int | None, make_tiny_model: Any, tmp_path: Any
) -> None:
    """The checkpoint with the maps folded into its weights gives the logits of the healed route in the engine
    (same architecture, fewer layers, a plain from_pretrained), sharded or not, and verifies."""
    from transformers import AutoModelForCausalLM

    from shortgpt_serve.checkpoint import verify_checkpoint, write_checkpoint
    from shortgpt_serve.healing.tensors import folded_tensors
    from shortgpt_serve.models.source import resolve_model

    src = make_tiny_model(model_type, max_shard_size=shard)
    source = resolve_model(str(src), tmp_path / "cache")
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    engine = PassEngine.of(model)
    removed = [2, 3]
    healing = fit_linear(engine, calibration(), removed, progress=False)
    layers_module = FAMILIES[model_type].layers_module
    out = write_checkpoint(
        source, removed, tmp_path / "short", overrides=folded_tensors(src, layers_module, healing.maps)
    )
    verify_checkpoint(out)
    short = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    batch = calibration(1)[0]
    got: list[torch.Tensor] = []
    engine.run(
        [batch],
        [Route(frozenset(removed), on_logits=lambda b, x: got.append(x), replace=healed_layers(engine, healing.maps))],
    )
    with torch.no_grad():
        want = short(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    real = batch.attention_mask.bool()
    assert torch.allclose(got[0][real], want[real], atol=1e-4)
    plain = write_checkpoint(source, removed, tmp_path / "plain")
    unhealed = AutoModelForCausalLM.from_pretrained(plain, dtype=torch.float32).eval()
    with torch.no_grad():
        other = unhealed(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    assert not torch.allclose(other[real], want[real], atol=1e-3)


def test_whole_layers_can_be_written_over_their_source_tensors(make_tiny_model: Any, tmp_path: Any) -> None:
    """Every weight of a healed layer (as a trained layer would be written) goes into the checkpoint in the source
    dtype: the checkpoint is the healed route's model, and the bytes of the folded down-projection match."""
    from transformers import AutoModelForCausalLM

    from shortgpt_serve.checkpoint import write_checkpoint
    from shortgpt_serve.healing.tensors import folded_tensors, layer_tensors
    from shortgpt_serve.models.source import resolve_model

    src = make_tiny_model("llama")
    source = resolve_model(str(src), tmp_path / "cache")
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    engine = PassEngine.of(model)
    healing = fit_linear(engine, calibration(), [3], progress=False)
    layers = healed_layers(engine, healing.maps)
    written = layer_tensors(src, "model.layers", layers)
    name = "model.layers.2.mlp.down_proj.weight"
    assert name in written and "model.layers.2.self_attn.q_proj.weight" in written
    assert written[name] == folded_tensors(src, "model.layers", healing.maps)[name]
    out = write_checkpoint(source, [3], tmp_path / "short", overrides=written)
    short = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    batch = calibration(1)[0]
    got: list[torch.Tensor] = []
    engine.run([batch], [Route(frozenset({3}), on_logits=lambda b, x: got.append(x), replace=layers)])
    with torch.no_grad():
        want = short(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    real = batch.attention_mask.bool()
    assert torch.allclose(got[0][real], want[real], atol=1e-4)
