"""The quality meter: one pass per call, candidates scored ahead, passes resumed at kept boundaries."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from shortgpt_serve.config import Config, override
from shortgpt_serve.models.loading import load_model, load_tokenizer
from shortgpt_serve.models.source import resolve_model
from shortgpt_serve.passes import PassEngine
from shortgpt_serve.quality.meter import QualityMeter
from tests.conftest import CORPUS


def meter(folder: Path, cache: Path) -> QualityMeter:
    config = override(
        Config(cache_dir=str(cache)),
        {"model": str(folder), "quality.tasks": ("arc_easy", "piqa"), "quality.limit": 10, "quality.batch_size": 6},
    )
    source = resolve_model(str(folder), cache)
    model = load_model(source, "cpu", "float32")
    heldout = [s.strip() + "." for s in CORPUS.split(".") if s.strip()]
    engine = PassEngine(model, source.family)
    return QualityMeter(config, source, engine, load_tokenizer(source), heldout, key={"test": str(folder)})


def test_ahead_and_resumed_candidates_score_as_fresh_passes(
    make_tiny_model: Callable[..., Path], tmp_path: Path
) -> None:
    folder = make_tiny_model("llama", max_position_embeddings=512)
    fast = meter(folder, tmp_path / "a")
    fast.resume_at = {2, 3}
    full = fast.measure_full(ahead=[[3, 4]])
    assert fast.passes == 1 and sorted(fast._boundaries) == [2, 3]
    got = fast.evaluate_many([[3, 4]]) + fast.evaluate_many([[2, 4], [3]])
    assert fast.passes == 2  # [3, 4] came from the full model's pass
    plain = meter(folder, tmp_path / "b")
    assert plain.measure_full() == full
    want = [plain([3, 4]), plain([2, 4]), plain([3])]
    assert plain.passes == 4
    assert got == want
    assert got[0] != got[2]  # the candidates differ, so equality above is not trivial
