"""The chain of stages: removal plans per criterion, the full model's scoring pass, prepare end to end."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from shortgpt_serve.config import Config, override
from shortgpt_serve.errors import QualityError
from shortgpt_serve.inputs import read_calibration
from shortgpt_serve.keys import quality_key
from shortgpt_serve.models import resolve_model
from shortgpt_serve.pipeline import RESUME_POINTS, full_quality, plan_removals, prepare
from shortgpt_serve.quality.meter import QualityMeter
from shortgpt_serve.selection import CostModel, removable
from shortgpt_serve.session import ModelSession, measure_profile
from tests.conftest import CORPUS


@pytest.fixture
def setup(make_tiny_model: Callable[..., Path], tmp_path: Path) -> Callable[..., tuple[Config, ModelSession]]:
    folder = make_tiny_model("llama", max_position_embeddings=512)
    text = tmp_path / "cal.txt"
    text.write_text("\n\n".join(f"Document {i}. {CORPUS}" for i in range(10)))

    def make(**settings: Any) -> tuple[Config, ModelSession]:
        base = {
            "model": str(folder),
            "cache_dir": str(tmp_path / "cache"),
            "calibration.path": str(text),
            "calibration.seq_len": 32,
            "calibration.num_tokens": 256,
            "quality.tasks": ("arc_easy",),
            "quality.limit": 10,
        }
        config = override(Config(), {**base, **settings})
        source = resolve_model(str(folder), tmp_path / "cache")
        return config, ModelSession(config, source, read_calibration(config))

    return make


def cost_of(session: ModelSession, config: Config) -> CostModel:
    s = session.source
    return CostModel.from_checkpoint(s.path, s.config, s.family.layers_module, config.selection.cost_context_tokens)


@pytest.mark.parametrize("criterion", ["bi", "angular", "iterative-bi"])
def test_plans_remove_only_removable_layers(setup: Callable[..., Any], criterion: str) -> None:
    config, session = setup(**{"selection.criterion": criterion, "selection.budget": 0.7})
    profile = measure_profile(session, progress=False)
    cost = cost_of(session, config)
    plan, timings = plan_removals(config, session, profile, cost)
    allowed = set(removable(6))
    assert plan[0] == [] and all(set(p) <= allowed and len(p) == n for n, p in enumerate(plan))
    if criterion == "bi":
        assert plan[1] == [min(allowed, key=lambda i: (profile.bi[i], i))]
    if criterion == "angular":
        assert all(p == list(range(p[0], p[0] + len(p))) for p in plan[1:])  # contiguous blocks
    if criterion == "iterative-bi":
        assert "iterative profiling" in timings
        # It stops once the budget is met, so its deepest plan is the first that meets it.
        assert cost.cost_ratio(plan[-1]) <= 0.7 < cost.cost_ratio(plan[-2])


def test_full_model_pass_scores_the_budget_candidate_and_keeps_boundaries(
    setup: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first pass scores the full model and the shallowest plan within the budget together; the search's
    later candidates find the full model's states at their first removed layers."""
    config, session = setup(**{"selection.budget": 0.6})
    profile = measure_profile(session, progress=False)
    cost = cost_of(session, config)
    plan, _ = plan_removals(config, session, profile, cost)
    n_budget = next(n for n, p in enumerate(plan) if cost.cost_ratio(p) <= 0.6)
    assert n_budget >= 2
    asked: list[list[list[int]]] = []
    real = QualityMeter._measure

    def spy(self: QualityMeter, removals: Any) -> Any:
        asked.append([list(r) for r in removals])
        return real(self, removals)

    monkeypatch.setattr(QualityMeter, "_measure", spy)
    key = quality_key(config, session.source, session.docs.heldout, _hashes(config))
    with pytest.raises(QualityError, match="at chance on every task"):  # a tiny random model
        full_quality(config, session, key, plan, cost, progress=False)
    assert asked == [[[], plan[n_budget]]]
    firsts = sorted({min(plan[n]) for n in range(1, n_budget)})
    fresh = {"not": "cached"}  # the first call cached the full model's scores under `key`
    meter = QualityMeter(config, session.source, session.engine(), _tokenizer(session), session.docs.heldout, fresh)
    assert len(firsts) <= RESUME_POINTS  # six layers: every first removed layer is kept
    meter.resume_at = set(firsts)
    meter.measure_full()
    assert sorted(meter._boundaries) == firsts


def test_prepare_writes_then_reuses_a_verified_checkpoint(setup: Callable[..., Any]) -> None:
    from shortgpt_serve.checkpoint import verify_checkpoint

    config, _ = setup(**{"quality.enabled": False, "selection.budget": 0.8})
    first = prepare(config, progress=False)
    again = prepare(config, progress=False)
    assert not first.reused and again.reused and again.checkpoint == first.checkpoint
    assert again.selection == first.selection and again.provenance == first.provenance
    record = verify_checkpoint(first.checkpoint)
    assert list(record.removed_layers) == first.selection.removed and first.selection.cost_ratio <= 0.8


def _hashes(config: Config) -> Any:
    from shortgpt_serve.cache import FileHashes

    return FileHashes(config.resolved_cache_dir())


def _tokenizer(session: ModelSession) -> Any:
    from shortgpt_serve.models.loading import load_tokenizer

    return load_tokenizer(session.source)


@pytest.mark.parametrize("method", ["linear", "distill"])
def test_prepare_heals_the_checkpoint_and_records_how(setup: Callable[..., Any], method: str) -> None:
    """--heal writes a checkpoint that differs from plain removal only in the healed layers' tensors, verifies,
    and records the method, its data and settings; the cache keeps healed and plain apart."""
    from safetensors.torch import load_file

    from shortgpt_serve.checkpoint import verify_checkpoint

    settings = {"quality.enabled": False, "selection.budget": 0.8, "heal.distill_steps": 3}
    plain = prepare(setup(**settings)[0], progress=False)
    healed = prepare(setup(**settings, **{"heal.method": method})[0], progress=False)
    assert healed.checkpoint != plain.checkpoint and healed.selection.removed == plain.selection.removed
    record = verify_checkpoint(healed.checkpoint)
    assert record.healing.method == method and plain.provenance.healing.method == "none"
    got, want = load_file(healed.checkpoint / "model.safetensors"), load_file(plain.checkpoint / "model.safetensors")
    assert got.keys() == want.keys()
    changed = {k for k in got if not torch.equal(got[k], want[k])}
    if method == "linear":
        assert record.healing.runs and record.healing.calibration_tokens == 256
        kept = {
            f"model.layers.{healed.selection.kept.index(r['kept_layer'])}.mlp.down_proj.weight"
            for r in record.healing.runs
        }
        assert changed == kept
    else:
        assert record.healing.steps == 3 and record.healing.linear_start is not None
        assert changed and all(k.startswith("model.layers.") for k in changed)
        assert not any("embed" in k or "lm_head" in k or k == "model.norm.weight" for k in changed)


def test_streamed_distillation_merges_adapters_into_every_projection(setup: Callable[..., Any]) -> None:
    """With the layers streamed, --heal distill trains rank-16 adapters one layer at a time and writes them merged
    into the kept layers' projection weights (norms, embeddings and head as plain removal writes them)."""
    from safetensors.torch import load_file

    from shortgpt_serve.checkpoint import MODEL_CARD_NAME, verify_checkpoint

    settings = {"quality.enabled": False, "selection.budget": 0.8, "heal.distill_steps": 3, "profile.memory": "stream"}
    plain = prepare(setup(**settings)[0], progress=False)
    healed = prepare(setup(**settings, **{"heal.method": "distill"})[0], progress=False)
    record = verify_checkpoint(healed.checkpoint)
    assert record.healing.method == "distill" and record.healing.rank == 16 and record.healing.steps == 3
    assert "rank-16 adapters merged" in (healed.checkpoint / MODEL_CARD_NAME).read_text()
    got, want = load_file(healed.checkpoint / "model.safetensors"), load_file(plain.checkpoint / "model.safetensors")
    changed = {k for k in got if not torch.equal(got[k], want[k])}
    projections = {
        k
        for k in want
        if k.startswith("model.layers.") and k.endswith("_proj.weight") and ("self_attn." in k or "mlp." in k)
    }
    assert changed == projections
