"""The pass engine against plain ``model(...)``: every family, skip-sets, shared candidates, layer-major order."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch

from shortgpt_serve.errors import ModelError
from shortgpt_serve.models.families import FAMILIES
from shortgpt_serve.models.layers import decoder_layers, skipped_layers
from shortgpt_serve.passes import Batch, PassEngine, Route
from shortgpt_serve.placement import Resident
from tests.conftest import tiny_config


def tiny(model_type: str) -> Any:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config(model_type)).eval()


def padded_batches() -> list[Batch]:
    """Two right-padded batches; 40 tokens is longer than the tiny sliding windows (16), so sliding and full
    attention layers see different masks."""
    g = torch.Generator().manual_seed(7)
    out = []
    for lengths in ((40, 31, 12), (25, 40)):
        ids = torch.randint(3, 300, (len(lengths), 40), generator=g)
        mask = torch.zeros_like(ids)
        for row, n in enumerate(lengths):
            mask[row, :n] = 1
        out.append(Batch(ids, mask))
    return out


def plain_logits(model: Any, batch: Batch) -> torch.Tensor:
    with torch.no_grad():
        logits: torch.Tensor = model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
        ).logits
    return logits


class Logits:
    def __init__(self) -> None:
        self.got: dict[int, torch.Tensor] = {}

    def __call__(self, b: int, logits: torch.Tensor) -> None:
        self.got[b] = logits.clone()


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_engine_equals_the_model_for_every_family(model_type: str) -> None:
    """The full route and a skip route in one pass give the logits of model(...) and of the model with those
    layers deleted, on real (unpadded) positions."""
    model = tiny(model_type)
    family = FAMILIES[model_type]
    chunks = padded_batches()
    skip = [1, 4]
    full, short = Logits(), Logits()
    PassEngine(model, family).run(chunks, [Route(on_logits=full), Route(frozenset(skip), on_logits=short)])
    for b, batch in enumerate(chunks):
        real = batch.attention_mask.bool()
        want = plain_logits(model, batch)
        with skipped_layers(model, family, skip):
            want_short = plain_logits(model, batch)
        assert torch.allclose(full.got[b][real], want[real], atol=1e-5)
        assert torch.allclose(short.got[b][real], want_short[real], atol=1e-5)
        assert (want_short[real] - want[real]).abs().max() > 1e-2  # skipping changed the output


def test_sliding_window_layers_get_their_own_masks() -> None:
    """Gemma2 alternates sliding and full attention: the captured masks differ by layer, as the model built them."""
    model = tiny("gemma2")
    engine = PassEngine(model, FAMILIES["gemma2"])
    captured = engine._capture(padded_batches()[0])
    masks = [kwargs["attention_mask"] for _, kwargs in captured.calls]
    types = list(model.config.layer_types)
    assert len(set(types)) == 2
    for i, j in ((0, 1), (0, 2)):
        same_type = types[i] == types[j]
        assert same_type == (masks[i] is masks[j] or torch.equal(masks[i], masks[j]))


def test_observers_see_each_layers_input_and_output() -> None:
    model = tiny("llama")
    layers = decoder_layers(model, FAMILIES["llama"])
    chunk = padded_batches()[1]
    seen: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def observe(layer: int, b: int, h_in: torch.Tensor, h_out: torch.Tensor, mask: torch.Tensor) -> None:
        seen[(layer, b)] = (h_in.clone(), h_out.clone())

    PassEngine(model, FAMILIES["llama"]).run([chunk], [Route(frozenset({2}), observers=[observe])])
    assert sorted(seen) == [(i, 0) for i in (0, 1, 3, 4, 5)]  # the skipped layer is not observed

    hooked: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(i: int) -> Any:
        def record(module: Any, args: Any, kwargs: Any, output: Any) -> None:
            out = output[0] if isinstance(output, tuple) else output
            hooked[i] = ((args[0] if args else kwargs["hidden_states"]).clone(), out.clone())

        return record

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        with skipped_layers(model, FAMILIES["llama"], [2]):
            plain_logits(model, chunk)
    finally:
        for h in handles:
            h.remove()
    for i in (0, 1, 3, 4, 5):
        assert torch.allclose(seen[(i, 0)][0], hooked[i][0], atol=1e-6)
        assert torch.allclose(seen[(i, 0)][1], hooked[i][1], atol=1e-6)


class CountingPlacement(Resident):
    """Resident, and records the order in which the pass asks for modules."""

    def __init__(self, model: Any) -> None:
        super().__init__(model, FAMILIES["llama"])
        self.asked: list[str] = []

    @contextmanager
    def embedding(self) -> Iterator[None]:
        self.asked.append("embedding")
        yield

    @contextmanager
    def layer(self, index: int) -> Iterator[torch.nn.Module]:
        self.asked.append(f"layer {index}")
        with super().layer(index) as layer:
            yield layer

    @contextmanager
    def head(self) -> Iterator[torch.nn.Module]:
        self.asked.append("head")
        with super().head() as norm:
            yield norm


def test_one_walk_over_the_weights_for_many_candidates() -> None:
    """Layer-major: each layer is asked for once per pass, in order, whatever the batches and candidates; and
    each layer runs once per batch and distinct route prefix (candidates share states until they differ)."""
    model = tiny("llama")
    placement = CountingPlacement(model)
    engine = PassEngine(model, FAMILIES["llama"], placement)
    calls = [0] * 6
    layers = decoder_layers(model, FAMILIES["llama"])
    handles = [
        layer.register_forward_hook(lambda *a, i=i: calls.__setitem__(i, calls[i] + 1))
        for i, layer in enumerate(layers)
    ]
    chunks = padded_batches()
    skips = [(), (3,), (3, 4), (1, 4)]
    readers = [Logits() for _ in skips]
    try:
        engine.run(chunks, [Route(frozenset(s), on_logits=r) for s, r in zip(skips, readers, strict=True)])
    finally:
        for h in handles:
            h.remove()
    assert placement.asked == ["embedding", *(f"layer {i}" for i in range(6)), "head"]
    # Distinct prefixes (layers skipped so far) among the routes that run each layer: layers 0, 1: {};
    # 2: {}, {1}; 3: {}, {1}; 4: {}, {3}; 5: {}, {3}, {3,4}, {1,4}. Times two batches.
    assert calls == [2 * n for n in (1, 1, 2, 2, 2, 4)]
    for skip, reader in zip(skips, readers, strict=True):
        for b, batch in enumerate(chunks):
            real = batch.attention_mask.bool()
            with skipped_layers(model, FAMILIES["llama"], skip):
                want = plain_logits(model, batch)
            assert torch.allclose(reader.got[b][real], want[real], atol=1e-5)


def test_logits_to_keep_returns_the_last_positions() -> None:
    model = tiny("llama")
    chunk = padded_batches()[0]
    kept = Logits()
    PassEngine.of(model).run([Batch(chunk.input_ids, chunk.attention_mask, logits_to_keep=5)], [Route(on_logits=kept)])
    want = plain_logits(model, chunk)
    assert kept.got[0].shape[1] == 5
    assert torch.allclose(kept.got[0], want[:, -5:], atol=1e-5)


def test_bad_skip_sets_and_families_are_refused() -> None:
    model = tiny("llama")
    with pytest.raises(ModelError, match="do not exist"):
        PassEngine.of(model).run(padded_batches(), [Route(frozenset({6}))])
    model.config.model_type = "bert"
    with pytest.raises(ModelError, match="not supported"):
        PassEngine.of(model)


def test_a_pass_resumes_at_a_kept_boundary() -> None:
    """States kept at a boundary of the full model's pass let a later pass start there: same logits as a pass
    from the embeddings, and the layers before the boundary do not run again."""
    model = tiny("qwen2")
    engine = PassEngine(model, FAMILIES["qwen2"])
    chunks = padded_batches()
    kept = engine.run(chunks, [Route(on_logits=Logits())], keep={3, 6})
    assert sorted(kept) == [3, 6] and len(kept[3].states) == len(chunks)
    calls = [0] * 6
    layers = decoder_layers(model, FAMILIES["qwen2"])
    handles = [
        layer.register_forward_hook(lambda *a, i=i: calls.__setitem__(i, calls[i] + 1))
        for i, layer in enumerate(layers)
    ]
    resumed, fresh = Logits(), Logits()
    try:
        engine.run(chunks, [Route(frozenset({4}), on_logits=resumed)], start=kept[3])
    finally:
        for h in handles:
            h.remove()
    assert calls == [0, 0, 0, 2, 0, 2]
    engine.run(chunks, [Route(frozenset({4}), on_logits=fresh)])
    for b in range(len(chunks)):
        assert torch.equal(resumed.got[b], fresh.got[b])
    # The final boundary (after the last layer) is the last layer's output; nothing kept where the full
    # model's states are not computed.
    assert sorted(engine.run(chunks, [Route(frozenset({1}))], keep={0, 1, 2, 6})) == [0, 1]
    with pytest.raises(ModelError, match="before the pass starts"):
        engine.run(chunks, [Route(frozenset({2}))], start=kept[3])


def test_candidates_beyond_free_memory_take_more_walks() -> None:
    """With room for the states of two routes only, four routes take two walks, and give the same logits."""
    model = tiny("llama")
    chunks = padded_batches()

    class Tight(CountingPlacement):
        def free_bytes(self) -> int | None:
            return 6 * engine.state_bytes(chunks)  # half of it for states: two routes, their outputs beside them

    placement = Tight(model)
    engine = PassEngine(model, FAMILIES["llama"], placement)
    assert engine.routes_per_walk(chunks) == 2
    skips = [(), (3,), (3, 4), (1, 4)]
    readers = [Logits() for _ in skips]
    engine.run(chunks, [Route(frozenset(s), on_logits=r) for s, r in zip(skips, readers, strict=True)])
    assert placement.asked.count("embedding") == 2 and placement.asked.count("layer 0") == 2
    roomy = [Logits() for _ in skips]
    loose_routes = [Route(frozenset(s), on_logits=r) for s, r in zip(skips, roomy, strict=True)]
    PassEngine(model, FAMILIES["llama"]).run(chunks, loose_routes)
    for tight, loose in zip(readers, roomy, strict=True):
        for b in range(len(chunks)):
            assert torch.equal(tight.got[b], loose.got[b])


def test_routes_run_their_own_replacement_layers() -> None:
    """A route that replaces layer 2 with a modified copy gives the logits of the model with that layer's weights
    changed; the full route beside it is untouched, and they share states only before layer 2."""
    import copy

    model = tiny("llama")
    family = FAMILIES["llama"]
    engine = PassEngine.of(model)
    healed = copy.deepcopy(decoder_layers(model, family)[2])
    with torch.no_grad():
        healed.mlp.down_proj.weight.mul_(3.0)
    chunks = padded_batches()
    routes = [Route(), Route(replace={2: healed}), Route(frozenset({4}), replace={2: healed})]
    readers = [Logits() for _ in routes]
    for route, reader in zip(routes, readers, strict=True):
        route.on_logits = reader
    engine.run(chunks, routes)
    full = [plain_logits(model, b) for b in chunks]
    original = decoder_layers(model, family)[2]
    layers = decoder_layers(model, family)
    layers[2] = healed
    try:
        changed = [plain_logits(model, b) for b in chunks]
        with skipped_layers(model, family, (4,)):
            changed_skip = [plain_logits(model, b) for b in chunks]
    finally:
        layers[2] = original
    for b, batch in enumerate(chunks):
        real = batch.attention_mask.bool()
        assert torch.allclose(readers[0].got[b][real], full[b][real], atol=1e-5)
        assert torch.allclose(readers[1].got[b][real], changed[b][real], atol=1e-5)
        assert torch.allclose(readers[2].got[b][real], changed_skip[b][real], atol=1e-5)
        assert not torch.allclose(readers[1].got[b][real], full[b][real], atol=1e-3)


def test_a_replacement_before_the_start_is_refused() -> None:
    model = tiny("llama")
    engine = PassEngine.of(model)
    kept = engine.run(padded_batches(), [Route()], keep={3})
    with pytest.raises(ModelError, match="come before the pass starts"):
        engine.run(padded_batches(), [Route(replace={1: torch.nn.Identity()})], start=kept[3])
