"""The meter's new measures end to end: KL and agreement, LAMBADA, the bootstrap interval, healed (replaced)
layers, and full-model cache entries that lack per-item outcomes."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from shortgpt_serve import cache
from shortgpt_serve.config import Config, override
from shortgpt_serve.models.loading import load_model, load_tokenizer
from shortgpt_serve.models.source import resolve_model
from shortgpt_serve.passes import PassEngine
from shortgpt_serve.quality.meter import QualityMeter
from tests.conftest import CORPUS
from tests.test_quality_measures import reference_divergence

MEASURES = ("tasks", "perplexity", "lambada", "lambada_se", "lambada_n")
"""Record keys that depend on the model alone (not on the full model it is compared with)."""


@pytest.fixture(scope="module")
def folder(make_tiny_model: Callable[..., Path]) -> Path:
    return make_tiny_model("llama", max_position_embeddings=512, initializer_range=0.2)


def meter(folder: Path, cache_dir: Path, key: str = "k", **settings: Any) -> QualityMeter:
    config = override(
        Config(cache_dir=str(cache_dir)),
        {
            "model": str(folder),
            "quality.tasks": ("arc_easy", "piqa"),
            "quality.limit": 10,
            "quality.batch_size": 6,
            "quality.lambada_limit": 12,
            "quality.bootstrap": 200,
            "calibration.seq_len": 48,
            "profile.batch_size": 3,
            **settings,
        },
    )
    source = resolve_model(str(folder), cache_dir)
    model = load_model(source, "cpu", "float32")
    heldout = [s.strip() + "." for s in CORPUS.split(".") if s.strip()]
    m = QualityMeter(config, source, PassEngine(model, source.family), load_tokenizer(source), heldout, {"k": key})
    m.progress = False
    return m


def perturbed(layer: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """A copy of a decoder layer with changed weights (as healing would change them)."""
    torch.manual_seed(seed)
    healed = copy.deepcopy(layer)
    with torch.no_grad():
        for p in healed.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return healed


def test_records_carry_divergence_lambada_and_interval(folder: Path, tmp_path: Path) -> None:
    m = meter(folder, tmp_path)
    full = m.measure_full()
    assert (full["kl"], full["kl_se"], full["agreement"], full["agreement_se"]) == (0.0, 0.0, 1.0, 0.0)
    assert full["lambada_n"] == 12 and 0.0 <= full["lambada"] <= 1.0
    (record,) = m.evaluate_many([[2, 3]])
    want = reference_divergence(m.engine.model, m._blocks, (2, 3))
    for key, value in want.items():
        assert record[key] == pytest.approx(value, abs=1e-4)
    assert record["kl"] > 0.01 and record["lambada_n"] == 12
    # A random model is at chance on every task: no retained share, so no interval for it.
    assert math.isnan(record["retained"]) and record["retained_ci"] is None
    # Switched off: None where not measured.
    off = meter(folder, tmp_path / "off", "off", **{"quality.perplexity_tokens": 0, "quality.lambada_limit": 0})
    off.measure_full()
    quiet = off([2, 3])
    assert all(quiet[k] is None for k in ("perplexity", "kl", "kl_se", "agreement", "agreement_se", "lambada"))
    no_bootstrap = meter(folder, tmp_path / "nb", "nb", **{"quality.bootstrap": 0})
    no_bootstrap.measure_full()
    assert no_bootstrap([2, 3])["retained_ci"] is None


def test_the_real_model_shows_damage_in_divergence_and_interval(tmp_path_factory: pytest.TempPathFactory) -> None:
    """SmolLM2-135M, scored on real items: the paired interval brackets quality retained, and removing more
    layers moves the next-token distribution further from the full model's."""
    from shortgpt_serve.calibration import load_documents

    cache_dir = tmp_path_factory.mktemp("real")
    source = resolve_model(None, cache_dir)
    config = override(
        Config(cache_dir=str(cache_dir)),
        {
            "quality.tasks": ("arc_easy",),
            "quality.limit": 40,
            "quality.lambada_limit": 20,
            "quality.bootstrap": 500,
            "quality.perplexity_tokens": 512,
            "calibration.seq_len": 128,
        },
    )
    docs = load_documents(None)
    engine = PassEngine(load_model(source, "cpu", "float32"), source.family)
    m = QualityMeter(config, source, engine, load_tokenizer(source), docs.heldout, {"real": 1}, docs.calibration)
    m.progress = False
    assert not {r.context + r.continuation for r in m.lambada} & set(docs.calibration)
    full = m.measure_full()
    assert full["lambada"] > 0 and full["lambada_n"] == 20
    one, three = m.evaluate_many([[20], [10, 20, 25]])
    for record in (one, three):
        low, high = record["retained_ci"]
        assert low <= record["retained"] <= high <= 1.0
        assert record["kl_se"] > 0 and record["agreement_se"] > 0
    assert 0 < one["kl"] < three["kl"] and 1 > one["agreement"] > three["agreement"]


def test_a_replaced_layer_scores_as_the_model_with_that_layer_changed(folder: Path, tmp_path: Path) -> None:
    healed = meter(folder, tmp_path / "a", "a")
    healed.resume_at = {1, 3}
    healed.measure_full(ahead=[[4]])
    assert sorted(healed._boundaries) == [1, 3] and healed.passes == 1
    replacement = perturbed(healed.engine.model.model.layers[2])
    # Changed at 2 and removed at 4: the pass must start at boundary 1, not 3. [4] was measured ahead, but
    # without the replacement: measured afresh.
    got_removed = healed([4], replace={2: replacement})
    assert healed.passes == 2
    plain = healed([4])
    assert healed.passes == 2 and plain != got_removed  # the plain [4] is the one measured ahead
    got_only = healed.evaluate_many([[]], [{2: replacement}])[0]

    changed = meter(folder, tmp_path / "b", "b")
    changed.engine.model.model.layers[2].load_state_dict(replacement.state_dict())
    want_only = changed.measure_full()
    want_removed = changed([4])
    for key in MEASURES:
        assert got_only[key] == want_only[key], key
        assert got_removed[key] == want_removed[key], key
    # Against the untouched full model: the divergence of the changed model with layer 4 removed.
    want = reference_divergence(healed.engine.model, healed._blocks, (4,), other=changed.engine.model)
    assert got_removed["kl"] == pytest.approx(want["kl"], abs=1e-4) and got_removed["kl"] > 0
    assert got_removed["agreement"] == pytest.approx(want["agreement"], abs=1e-9)


def test_cached_full_scores_without_item_outcomes_are_measured_again(folder: Path, tmp_path: Path) -> None:
    first = meter(folder, tmp_path)
    full = first.measure_full()
    want = first([2, 3])
    cache_dir = first.config.resolved_cache_dir()
    entry = cache.load_json(cache_dir, "quality", first.key)
    assert entry is not None and set(entry["correct"]) == {"arc_easy", "piqa"}
    assert len(entry["correct"]["piqa"]) == 10 and len(entry["lambada"]["correct"]) == 12

    # Reused: no pass for the full model; the candidate's pass needs one over the held-out text first.
    reused = meter(folder, tmp_path)
    assert reused.measure_full() == full and reused.passes == 0
    assert reused([2, 3]) == want and reused.passes == 2

    # An older entry (no per-item outcomes) is measured again and replaced.
    cache.store_json(cache_dir, "quality", first.key, {k: v for k, v in entry.items() if k != "correct"})
    older = meter(folder, tmp_path)
    assert older.measure_full() == full and older.passes == 1
    assert cache.load_json(cache_dir, "quality", first.key) == entry

    # Other LAMBADA items than the entry was measured on: measured again.
    fewer = meter(folder, tmp_path, **{"quality.lambada_limit": 5})
    fewer.measure_full()
    assert fewer.passes == 1 and fewer.full["lambada_n"] == 5
    assert fewer([2, 3])["lambada_n"] == 5
