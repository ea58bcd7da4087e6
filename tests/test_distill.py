"""Distillation healing: the trained kept layers against KL measured independently, the model left untouched."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from shortgpt_serve.errors import HealingError
from shortgpt_serve.healing.distill import distill
from shortgpt_serve.healing.linear import fit_linear, healed_layers
from shortgpt_serve.models.layers import decoder_layers
from shortgpt_serve.passes import Batch, PassEngine, Route
from tests.conftest import padded_calibration as calibration
from tests.conftest import tiny_config

REMOVED = [2, 3]


def tiny(model_type: str = "llama", dtype: torch.dtype = torch.float32) -> Any:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config(model_type)).eval().to(dtype)


def mean_kl(p_logits: list[torch.Tensor], q_logits: list[torch.Tensor]) -> float:
    """Mean over positions of sum_v p (log p - log q), in float64."""
    total, n = 0.0, 0
    for p, q in zip(p_logits, q_logits, strict=True):
        log_p, log_q = p.double().log_softmax(-1), q.double().log_softmax(-1)
        total += float((log_p.exp() * (log_p - log_q)).sum())
        n += p.shape[0]
    return total / n


def full_logits(model: Any, batches: list[Batch]) -> list[torch.Tensor]:
    """The full model's logits at the real positions, from its plain forward."""
    out = []
    with torch.no_grad():
        for b in batches:
            logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False).logits
            out.append(logits[b.attention_mask.bool()])
    return out


def short_logits(engine: PassEngine, batches: list[Batch], replace: dict[int, torch.nn.Module]) -> list[torch.Tensor]:
    """The shortened model's logits at the real positions: REMOVED skipped, ``replace`` run for kept layers."""
    got: dict[int, torch.Tensor] = {}
    route = Route(
        frozenset(REMOVED),
        on_logits=lambda b, x: got.__setitem__(b, x[batches[b].attention_mask.bool()]),
        replace=replace,
    )
    engine.run(batches, [route])
    return [got[b] for b in range(len(batches))]


def run(engine: PassEngine, batches: list[Batch], **kwargs: Any) -> Any:
    settings = {"steps": 30, "batch_size": 2, "lr": 1e-3, "seed": 0, "progress": False, **kwargs}
    return distill(engine, batches, REMOVED, **settings)


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gemma2"])
def test_distillation_brings_the_logits_closer_to_the_full_model(model_type: str) -> None:
    model = tiny(model_type)
    engine = PassEngine.of(model)
    batches = calibration()
    target = full_logits(model, batches)
    before = mean_kl(target, short_logits(engine, batches, {}))
    dist = run(engine, batches)
    after = mean_kl(target, short_logits(engine, batches, dist.layers))
    assert after < 0.8 * before
    assert sorted(dist.layers) == [i for i in range(6) if i not in REMOVED]
    assert dist.kl_last < dist.kl_first
    record = dist.record()
    assert record["method"] == "distill" and record["steps"] == 30 and record["removed"] == REMOVED
    # 9 sequences in micro-batches of 2: 5 per pass over the data, so 30 steps see every sequence 6 times.
    assert record["tokens"] == 6 * sum(int(b.attention_mask.sum()) for b in batches)


def test_the_first_step_loss_is_the_kl_of_the_starting_model() -> None:
    """One step over every sequence at once: its loss is the KL of the model it starts from, plain removal or
    linear healing, measured with the pass engine."""
    model = tiny(dtype=torch.float64)
    engine = PassEngine.of(model)
    batches = calibration()
    target = full_logits(model, batches)
    healed = healed_layers(engine, fit_linear(engine, batches, REMOVED, progress=False).maps)
    for start in ({}, healed):
        dist = run(engine, batches, start=start, steps=1, batch_size=9)
        assert dist.kl[0] == pytest.approx(mean_kl(target, short_logits(engine, batches, start)), rel=1e-9)


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_starting_from_linear_healing_starts_closer(model_type: str) -> None:
    """The KL the distillation starts from, over the whole calibration (one step with every sequence), is lower
    from linear healing than from plain removal; the modules handed in as the start are copied, not trained."""
    model = tiny(model_type)
    engine = PassEngine.of(model)
    batches = calibration()
    healed = healed_layers(engine, fit_linear(engine, batches, REMOVED, progress=False).maps)
    given = copy.deepcopy({k: m.state_dict() for k, m in healed.items()})
    plain = run(engine, batches, steps=1, batch_size=9)
    linear = run(engine, batches, steps=1, batch_size=9, start=healed)
    assert linear.kl[0] < plain.kl[0]
    for k, layer in healed.items():
        assert all(torch.equal(v, given[k][n]) for n, v in layer.state_dict().items())
        assert not torch.equal(layer.mlp.down_proj.weight, linear.layers[k].mlp.down_proj.weight)


def test_the_model_is_left_exactly_as_it_was() -> None:
    model = tiny("qwen2")
    engine = PassEngine.of(model)
    batches = calibration()
    state = copy.deepcopy(model.state_dict())
    config = model.config.to_dict()
    layers = decoder_layers(model, engine.family)
    idx = [layer.self_attn.layer_idx for layer in layers]
    logits = full_logits(model, batches)
    dist = run(engine, batches, steps=5)
    assert decoder_layers(model, engine.family) is layers
    assert [layer.self_attn.layer_idx for layer in layers] == idx
    assert model.config.to_dict() == config
    now = model.state_dict()
    assert now.keys() == state.keys()
    assert all(torch.equal(now[k], state[k]) for k in state)
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(full_logits(model, batches), logits, strict=True))
    for i, layer in dist.layers.items():
        assert layer is not layers[i] and layer.self_attn.layer_idx == i
        assert not layer.training
        assert not any(p.requires_grad or p.grad is not None for p in layer.parameters())


def test_runs_are_deterministic_under_the_seed() -> None:
    model = tiny()
    engine = PassEngine.of(model)
    batches = calibration()

    def weights(seed: int) -> dict[str, torch.Tensor]:
        dist = run(engine, batches, seed=seed, steps=8)
        return {f"{i}.{n}": p for i, layer in dist.layers.items() for n, p in layer.state_dict().items()}

    first, again, other = weights(0), weights(0), weights(1)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)


def test_a_bfloat16_model_trains_in_float32_and_gets_bfloat16_layers() -> None:
    model = tiny(dtype=torch.bfloat16)
    engine = PassEngine.of(model)
    batches = calibration()
    target = full_logits(model, batches)
    before = mean_kl(target, short_logits(engine, batches, {}))
    dist = run(engine, batches, lr=1e-4)
    assert all(p.dtype == torch.bfloat16 for layer in dist.layers.values() for p in layer.parameters())
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    # Most entries of every weight matrix moved by more than a bfloat16 step: the updates (about lr = 1e-4 a step)
    # added up in float32. Norm scales near 1 move less than their bfloat16 step in 30 such steps.
    for i, layer in dist.layers.items():
        original = dict(decoder_layers(model, engine.family)[i].named_parameters())
        for name, p in layer.named_parameters():
            if p.dim() == 2:
                assert float((p != original[name]).float().mean()) > 0.5, name
    assert mean_kl(target, short_logits(engine, batches, dist.layers)) < before


def test_refusals() -> None:
    model = tiny()
    engine = PassEngine.of(model)
    with pytest.raises(HealingError, match="no layer is removed") as empty:
        distill(engine, calibration(), [], steps=1, batch_size=2, lr=1e-4, seed=0, progress=False)
    ids = torch.randint(3, 300, (2, 40))
    with pytest.raises(HealingError, match=r"at least 128 calibration tokens.*has 80.*--calibration-tokens") as few:
        distill(engine, [Batch(ids, torch.ones_like(ids))], REMOVED, steps=1, batch_size=2, lr=1e-4, seed=0)
    assert "\n" not in empty.value.message and "\n" not in few.value.message
