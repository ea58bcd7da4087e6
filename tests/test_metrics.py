from __future__ import annotations

from prometheus_client import generate_latest

from shortgpt_serve.metrics import LauncherMetrics


def values(metrics: LauncherMetrics) -> dict[str, float]:
    text = generate_latest(metrics.registry).decode()
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("shortgpt_")
    }


def task(score: float, metric: str = "acc") -> dict:
    return {"score": score, "metric": metric}


PROVENANCE = {
    "source": {"num_layers": 6, "origin": "x"},
    "removed_layers": [2, 4],
    "block_influence": [0.9, 0.1, 0.01, 0.2, 0.02, 0.3],
    "selection": {
        "budget": 0.75,
        "cost_ratio": 0.8,
        "params_full": 1000,
        "params_short": 700,
        "min_quality": 0.85,
        "latency_met": False,
        "quality_met": True,
    },
    "quality": {
        "full": {"tasks": {"arc_easy": task(0.55), "piqa": task(0.67, "acc_norm")}, "perplexity": 44.7},
        "shortened": {
            "tasks": {"arc_easy": task(0.52), "piqa": task(0.65, "acc_norm")},
            "perplexity": 67.2,
            "retained": 0.86,
        },
    },
}


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
    m.record_checkpoint({k: v for k, v in PROVENANCE.items() if k != "quality"})
    v = values(m)
    assert v["shortgpt_layers_removed"] == 2
    assert not any(k.startswith("shortgpt_task_accuracy_ratio{") for k in v)
