"""Low-rank adapters distilled one layer at a time: exact gradients, streamed equal to resident, merged weights
equal to the adapted layers, and the KL to the full model lowered."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from shortgpt_serve.healing.adapters import LayerAdapters, MergedTensors, adapted, linear_names
from shortgpt_serve.healing.distill import kl_loss, padded, teacher_states
from shortgpt_serve.healing.layerwise import _Stack, distill_adapters, step_gradients
from shortgpt_serve.models.families import FAMILIES
from shortgpt_serve.models.layers import decoder_layers, skipped_layers
from shortgpt_serve.passes import Batch, PassEngine
from shortgpt_serve.streaming import Streamed, empty_model
from tests.conftest import padded_calibration as calibration
from tests.test_distill import REMOVED, full_logits, mean_kl, short_logits, tiny


def nonzero_adapters(engine: PassEngine, kept: list[int], rank: int = 4) -> dict[int, LayerAdapters]:
    """Adapters whose B is not zero (as after some training), so every adapter tensor has a gradient."""
    g = torch.Generator().manual_seed(5)
    layers = decoder_layers(engine.model, engine.family)
    out = {}
    for i in kept:
        a = LayerAdapters(layers[i], rank, engine.device, g)
        with torch.no_grad():
            for name in a.b:
                a.b[name].copy_(torch.randn(a.b[name].shape, generator=g) * 0.05)
        out[i] = a
    return out


def reference_gradients(model: Any, family: Any, adapters: dict[int, LayerAdapters], batch: Batch) -> list[Any]:
    """Autograd over the model's own forward: REMOVED cut, every kept layer's adapters attached; teacher = the
    full model's own logits."""
    from contextlib import ExitStack

    with torch.no_grad():
        target = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    layers = decoder_layers(model, family)
    with ExitStack() as stack, skipped_layers(model, family, REMOVED):
        for i, a in adapters.items():
            stack.enter_context(a.attached(layers[i]))
        student = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
        loss = kl_loss(target, student, batch.attention_mask)
    params = [p for a in adapters.values() for p in a.parameters()]
    return [float(loss.detach()), *torch.autograd.grad(loss, params)]


@pytest.mark.parametrize(
    ("model_type", "blocks"), [("llama", False), ("llama", True), ("qwen2", False), ("gemma2", True)]
)
def test_layer_by_layer_gradients_equal_autograd_through_the_whole_model(
    model_type: str, blocks: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Also with the head's logits a block of positions at a time (blocks of 7 of the 64 positions)."""
    from shortgpt_serve.healing import layerwise

    model = tiny(model_type)
    engine = PassEngine.of(model)
    batch = calibration(1)[0]
    if blocks:
        monkeypatch.setattr(layerwise, "LOGIT_ELEMENTS", 7 * batch.input_ids.shape[0] * model.config.vocab_size)
    kept = [i for i in range(engine.num_layers) if i not in REMOVED]
    adapters = nonzero_adapters(engine, kept)
    loss, *want = reference_gradients(model, engine.family, adapters, batch)
    final = teacher_states(engine, [batch])
    teacher = padded(final, batch.input_ids.shape[1])
    got_loss = step_gradients(engine, _Stack(engine, kept, {}, adapters), batch, teacher)
    got = [p.grad for a in adapters.values() for p in a.parameters()]
    assert float(got_loss) == pytest.approx(loss, rel=1e-5)
    assert len(got) == len(want) == 2 * len(kept) * len(linear_names(decoder_layers(model, engine.family)[0]))
    for g, w in zip(got, want, strict=True):
        assert g is not None and float(w.abs().max()) > 0
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-7)


def test_adapter_distillation_lowers_the_kl_and_leaves_the_model_untouched() -> None:
    model = tiny()
    engine = PassEngine.of(model)
    batches = calibration()
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    target = full_logits(model, batches)
    plain = mean_kl(target, short_logits(engine, batches, {}))
    dist = distill_adapters(engine, batches, REMOVED, rank=4, steps=30, batch_size=2, lr=1e-2, seed=0, progress=False)
    healed = mean_kl(target, short_logits(engine, batches, dist.layers))
    assert healed < 0.8 * plain
    assert dist.rank == 4 and dist.record()["rank"] == 4 and len(dist.kl) == 30
    assert all(torch.equal(v, before_state[k]) for k, v in model.state_dict().items())
    again = distill_adapters(engine, batches, REMOVED, rank=4, steps=30, batch_size=2, lr=1e-2, seed=0, progress=False)
    assert again.kl == dist.kl  # deterministic under the seed


@pytest.mark.parametrize("ahead", [None, 20_000], ids=["whole-layer-ahead", "part-ahead"])
def test_streamed_adapter_distillation_equals_the_resident_one(
    make_tiny_model: Callable[..., Path], ahead: int | None
) -> None:
    """Also with a read-ahead of part of a layer (the tiny model's layers are ~50 KB in float32): the backward walk
    reads ahead in its own order, the rest of each layer when it starts."""
    folder = make_tiny_model("llama")
    from transformers import AutoModelForCausalLM

    family = FAMILIES["llama"]
    resident = PassEngine(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(), family)
    skeleton = empty_model(folder, "float32", torch.device("cpu"))
    placement = Streamed(skeleton, family, folder, torch.device("cpu"), ahead)
    if ahead is not None:
        assert 0 < placement._bytes(placement._ahead[1]) <= ahead < placement.unit_bytes()["layer"]
    streamed = PassEngine(skeleton, family, placement)
    batches = calibration()
    settings: dict[str, Any] = {"rank": 4, "steps": 6, "batch_size": 2, "lr": 1e-2, "seed": 0, "progress": False}
    try:
        want = distill_adapters(resident, batches, REMOVED, **settings)
        got = distill_adapters(streamed, batches, REMOVED, **settings)
        assert got.kl == pytest.approx(want.kl, rel=1e-5)
        assert got.adapters is not None and want.adapters is not None
        for i, a in want.adapters.items():
            for name in a.b:
                torch.testing.assert_close(got.adapters[i].b[name], a.b[name], rtol=1e-4, atol=1e-6)
        # Evaluated through the streamed placement: the adapted layers run on the weights the pass brings in.
        torch.testing.assert_close(
            torch.cat(short_logits(streamed, batches, got.layers)),
            torch.cat(short_logits(resident, batches, want.layers)),
            rtol=1e-4,
            atol=1e-5,
        )
    finally:
        placement.close()


def test_merged_weights_compute_what_the_adapted_layer_computes(make_tiny_model: Callable[..., Path]) -> None:
    """The writer's data for each projection (W + B A, in the source dtype) makes a plain layer compute what the
    adapted one computes; a folded map's data is the base it merges into."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    folder = make_tiny_model("llama")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    engine = PassEngine.of(model)
    adapters = nonzero_adapters(engine, [1])
    prefix = engine.family.layers_module
    down = f"{prefix}.1.mlp.down_proj.weight"
    source = load_file(folder / "model.safetensors")
    base = (source[down] * 0.5).contiguous()
    merged = MergedTensors(folder, prefix, adapters, {down: base.view(torch.uint8).numpy().tobytes()})
    assert set(merged) == {f"{prefix}.1.{n}.weight" for n in linear_names(decoder_layers(model, engine.family)[1])}
    layer = decoder_layers(model, engine.family)[1]
    plain = __import__("copy").deepcopy(layer)
    with torch.no_grad():
        for key in merged:
            name = key.removeprefix(f"{prefix}.1.")
            data = torch.frombuffer(bytearray(merged[key]), dtype=torch.float32).view(source[key].shape)
            start = base if key == down else source[key]
            torch.testing.assert_close(data, start + adapters[1].delta(name.removesuffix(".weight")).float())
            plain.get_submodule(name.removesuffix(".weight")).weight.copy_(data)
        plain.get_submodule("mlp.down_proj").weight.copy_(source[down] + adapters[1].delta("mlp.down_proj").float())
    h = torch.randn(2, 5, model.config.hidden_size, generator=torch.Generator().manual_seed(2))
    rotary = model.model.rotary_emb(h, torch.arange(5)[None].expand(2, 5))
    with torch.no_grad():
        want = adapted(layer, adapters[1])(h, position_embeddings=rotary, attention_mask=None)
        got = plain(h, position_embeddings=rotary, attention_mask=None)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_distillation_trains_adapters_where_the_layers_training_would_not_fit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """heal.distill_rank 0: the layers themselves where their training fits the free memory, else rank-16
    adapters, saying why; a rank set is used as it is."""
    import dataclasses

    from shortgpt_serve.config import Config, HealConfig
    from shortgpt_serve.healing.distill import training_bytes
    from shortgpt_serve.healing.evaluate import distill_rank

    engine = PassEngine.of(tiny())
    need = training_bytes(engine, REMOVED)
    kept_params = sum(
        p.numel()
        for i, m in enumerate(decoder_layers(engine.model, engine.family))
        if i not in REMOVED
        for p in m.parameters()
    )
    assert need == 20 * kept_params
    config = Config(heal=HealConfig(method="distill"))
    monkeypatch.setattr(engine.placement, "free_bytes", lambda: 2 * need)
    assert distill_rank(config, engine, REMOVED) == (0, "")
    monkeypatch.setattr(engine.placement, "free_bytes", lambda: need)
    rank, why = distill_rank(config, engine, REMOVED)
    assert rank == 16 and "training the layers themselves takes" in why and "is free on cpu" in why
    chosen = dataclasses.replace(config, heal=dataclasses.replace(config.heal, distill_rank=4))
    assert distill_rank(chosen, engine, REMOVED) == (4, "heal.distill_rank")


def test_merged_shards_are_written_as_many_at_a_time_as_memory_holds(
    make_tiny_model: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import psutil

    from shortgpt_serve.checkpoint import _threads_for
    from shortgpt_serve.models.weights import weight_map

    folder = make_tiny_model("llama")
    engine = PassEngine.of(tiny())
    merged = MergedTensors(folder, engine.family.layers_module, nonzero_adapters(engine, [0, 1]))
    mapping = weight_map(folder)

    class Memory:
        def __init__(self, available: int) -> None:
            self.available = available

    monkeypatch.setattr(psutil, "virtual_memory", lambda: Memory(1 << 40))
    assert _threads_for(folder, mapping, merged, 8) == 8
    monkeypatch.setattr(psutil, "virtual_memory", lambda: Memory(1 << 10))
    assert _threads_for(folder, mapping, merged, 8) == 1
