"""The provenance record: JSON -> dataclass -> JSON unchanged, the one builder, and reading old or damaged records."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from shortgpt_serve.config import Config
from shortgpt_serve.profile import LayerProfile
from shortgpt_serve.provenance import Provenance, QualityRecord, build_provenance
from shortgpt_serve.selection import Selection


def task(score: float, metric: str = "acc") -> dict[str, Any]:
    return {
        "acc": score,
        "acc_norm": score,
        "metric": metric,
        "score": score,
        "chance": 0.25,
        "n": 100,
        "retained": None,
    }


FULL = {
    "tasks": {"arc_easy": task(0.55), "piqa": task(0.67, "acc_norm")},
    "perplexity": 44.7,
    "retained": 1.0,
    "raw_ratio": 1.0,
    "no_signal": [],
}
SHORTENED = {
    "tasks": {"arc_easy": {**task(0.52), "retained": 0.9}, "piqa": {**task(0.65, "acc_norm"), "retained": 0.95}},
    "perplexity": 67.2,
    "retained": 0.86,
    "retained_se": 0.04,
    "raw_ratio": 0.95,
    "no_signal": [],
}
# A record as `prune` writes it (every key, in the order of the file).
RECORD: dict[str, Any] = {
    "tool": "shortgpt-serve",
    "tool_version": "0.1.0",
    "created": "2025-01-01T00:00:00+00:00",
    "served_model_name": "tiny-short",
    "source": {
        "name": "tiny",
        "origin": "/models/tiny",
        "sha256": "ab" * 32,
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "num_layers": 6,
    },
    "removed_layers": [2, 4],
    "kept_layers": [0, 1, 3, 5],
    "calibration": {
        "source": "cal.txt",
        "sha256": "cd" * 32,
        "num_tokens": 512,
        "num_sequences": 16,
        "seq_len": 32,
        "heldout_fraction": 0.2,
        "seed": 0,
    },
    "block_influence": [0.9, 0.1, 0.01, 0.2, 0.02, 0.3],
    "selection": {
        "criterion": "bi",
        "budget": 0.75,
        "cost_ratio": 0.8,
        "cost_context_tokens": 512,
        "params_full": 1000,
        "params_short": 700,
        "min_quality": 0.85,
        "latency_met": False,
        "quality_met": True,
        "reason": "the accuracy floor wins",
    },
    "quality": {"full": FULL, "shortened": SHORTENED},
    "healing": {
        "method": "linear",
        "ridge": 0.0001,
        "objective": "squared",
        "calibration_tokens": 16384,
        "seconds": 12.5,
        "runs": [{"kept_layer": 1, "removed": [2], "error_plain": 0.2, "error_healed": 0.1}],
        "unhealed_runs": [],
    },
    "files": {"config.json": "00" * 32, "model.safetensors": "11" * 32},
}


def record(**changes: Any) -> Provenance:
    return Provenance.from_json({**copy.deepcopy(RECORD), **changes})


def test_json_round_trip_is_unchanged() -> None:
    p = Provenance.from_json(RECORD)
    assert p.to_json() == RECORD
    assert json.dumps(p.to_json()) == json.dumps(RECORD)  # the same keys in the same order
    assert Provenance.from_json(json.loads(p.dumps())) == p


def test_attributes_read_the_record() -> None:
    p = Provenance.from_json(RECORD)
    assert p.source.num_layers == 6 and p.num_kept == 4 and p.removed_layers == (2, 4)
    assert p.selection is not None and p.selection.cost_ratio == 0.8 and p.selection.latency_met is False
    assert p.quality is not None and p.quality.full.tasks["piqa"].metric == "acc_norm"
    assert p.shortened_quality is not None and p.shortened_quality.retained == 0.86


def test_shortened_quality_is_the_full_models_when_nothing_was_removed() -> None:
    nothing_removed = record(removed_layers=[], kept_layers=list(range(6)), quality={"full": FULL, "shortened": None})
    assert nothing_removed.shortened_quality == QualityRecord.from_json(FULL)
    assert record(quality={"full": FULL, "shortened": None}).shortened_quality is None
    assert record(quality=None).shortened_quality is None


def test_quality_records_keep_only_the_keys_they_had() -> None:
    # The full model's record has no standard error; writing it back must not add one.
    assert "retained_se" not in QualityRecord.from_json(FULL).to_json()
    assert QualityRecord.from_json(SHORTENED).to_json() == SHORTENED


def test_a_bare_record_reads_with_defaults() -> None:
    bare = {k: RECORD[k] for k in ("tool", "tool_version", "created", "source", "removed_layers", "kept_layers")}
    p = Provenance.from_json({**bare, "calibration": {}})
    assert p.selection is None and p.quality is None and p.block_influence is None and p.files == {}
    assert p.calibration.source is None and p.to_json()["calibration"] == {}


def test_checkpoint_hash_follows_the_files() -> None:
    a = record()
    assert a.checkpoint_sha256() == record().checkpoint_sha256()
    assert a.checkpoint_sha256() != record(files={"config.json": "22" * 32}).checkpoint_sha256()


@pytest.mark.parametrize("missing", ["source", "removed_layers"])
def test_a_record_without_its_core_is_refused(missing: str) -> None:
    with pytest.raises(KeyError):
        Provenance.from_json({k: v for k, v in RECORD.items() if k != missing})


def fake_source() -> Any:
    """What the builder reads of a ModelSource."""
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}
    return SimpleNamespace(name="tiny", origin="/models/tiny", sha256="ab" * 32, config=config, num_layers=6)


def test_builder_makes_the_record_prune_writes() -> None:
    profile = LayerProfile(
        bi=RECORD["block_influence"],
        num_tokens=512,
        num_sequences=16,
        seq_len=32,
        calibration_source="cal.txt",
        calibration_sha256="cd" * 32,
    )
    selection = Selection(
        removed=[4, 2],
        budget=0.75,
        cost_ratio=0.8,
        params_full=1000,
        params_short=700,
        num_layers=6,
        candidates=[],
        reason="the accuracy floor wins",
        min_quality=0.85,
        quality=SHORTENED,
        latency_met=False,
        quality_met=True,
    )
    p = build_provenance(
        fake_source(),
        selection.removed,
        served_model_name="tiny-short",
        profile=profile,
        selection=selection,
        config=Config(),
        full=FULL,
        healing=RECORD["healing"],
    )
    want = {**RECORD, "tool_version": p.tool_version, "created": p.created, "files": {}}
    assert p.to_json() == want


def test_builder_without_a_profile_records_the_cut_only() -> None:
    p = build_provenance(fake_source(), [3])
    assert p.removed_layers == (3,) and p.kept_layers == (0, 1, 2, 4, 5)
    assert p.selection is None and p.quality is None and p.to_json()["calibration"] == {}


def test_checkpoint_carries_the_built_record(tiny_llama: Path, tmp_path: Path) -> None:
    from shortgpt_serve.checkpoint import read_provenance, verify_checkpoint, write_checkpoint
    from shortgpt_serve.errors import CheckpointError
    from shortgpt_serve.models.source import resolve_model

    source = resolve_model(str(tiny_llama), tmp_path / "cache")
    built = build_provenance(source, [1, 3], served_model_name="tiny-short")
    out = write_checkpoint(source, [3, 1], tmp_path / "short", provenance=built)
    got = verify_checkpoint(out)
    assert got.served_model_name == "tiny-short" and got.removed_layers == (1, 3)
    assert set(got.files) >= {"config.json", "model.safetensors", "README.md"}
    assert got.to_json() == {**built.to_json(), "files": got.files}
    with pytest.raises(CheckpointError, match="lists layers \\[1, 3\\] removed, not \\[2\\]"):
        write_checkpoint(source, [2], tmp_path / "other", provenance=built)
    (out / "shortgpt.json").write_text(json.dumps({"tool": "shortgpt-serve"}))
    with pytest.raises(CheckpointError, match="is not a provenance record"):
        read_provenance(out)


def test_a_healed_record_keeps_its_plain_twin_and_gain_interval() -> None:
    healed = {**SHORTENED, "retained_ci": [0.8, 0.9], "plain": SHORTENED, "gain_ci": [0.01, 0.2]}
    q = QualityRecord.from_json(healed)
    assert q.gain_ci == (0.01, 0.2) and q.plain is not None and q.plain.gain_ci is None
    assert q.to_json() == healed
