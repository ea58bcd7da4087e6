from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from shortgpt_serve.errors import BudgetError, ConfigError
from shortgpt_serve.selection import CostModel, plan_angular, plan_bi, removal_order, select_depth

# SmolLM2-135M's shapes: 30 layers of 3,538,944 parameters (attention 884,736 + gated MLP 2,654,208),
# tied 49152 x 576 embeddings and a final norm.
SMOL_LAYER = 576 * (576 + 192 + 192 + 576) + 3 * 576 * 1536 + 2 * 576
SMOL_OTHER = 49152 * 576 + 576


def smol_cost(context: int = 0) -> CostModel:
    attention = 4.0 * 9 * 64 * context
    return CostModel([2.0 * SMOL_LAYER + attention] * 30, 2.0 * 49152 * 576, [SMOL_LAYER] * 30, SMOL_OTHER)


def test_cost_model_matches_known_ideal_speedup() -> None:
    cost = smol_cost()
    assert cost.full_params == 134_515_008  # SmolLM2-135M's published parameter count
    # 22 of 30 layers: the FLOP-ideal speedup is 1.27x.
    assert 1 / cost.cost_ratio(list(range(8))) == pytest.approx(1.27, abs=0.005)
    assert cost.params(list(range(8))) == cost.full_params - 8 * SMOL_LAYER


def test_cost_model_reads_shapes_from_checkpoint(tiny_llama: Path) -> None:
    import json

    from transformers import AutoModelForCausalLM

    config = json.loads((tiny_llama / "config.json").read_text())
    cost = CostModel.from_checkpoint(tiny_llama, config, "model.layers", context=0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    per_layer = [sum(p.numel() for p in layer.parameters()) for layer in model.model.layers]
    assert cost.layer_params == per_layer
    assert cost.full_params == sum(p.numel() for p in model.parameters())  # tied weights counted once
    assert cost.head_flops == 2.0 * config["vocab_size"] * config["hidden_size"]
    with_context = CostModel.from_checkpoint(tiny_llama, config, "model.layers", context=100)
    assert with_context.layer_flops[0] - cost.layer_flops[0] == 4.0 * config["hidden_size"] * 100


def test_select_fewest_lowest_bi_layers_within_budget() -> None:
    bi = [0.9, 0.2] + [0.05 + 0.001 * i for i in range(27)] + [0.3]
    bi[20] = 0.01  # least influential
    cost = smol_cost(512)
    sel = select_depth(plan_bi(bi), cost, 0.75)
    assert sel.cost_ratio <= 0.75
    n = len(sel.removed)
    # One layer fewer would be over the budget: the fewest layers were removed.
    assert sel.candidates[n - 1].cost_ratio > 0.75
    assert 20 in sel.removed
    assert sel.removed == sorted(removal_order(bi)[:n])
    assert 0 not in sel.removed and 29 not in sel.removed  # first and last layers are protected by default
    assert sel.params_short == cost.params(sel.removed)
    assert f"{n} lowest-BI layers" in sel.reason and "over it" in sel.reason


def test_budget_one_removes_nothing_and_lower_budgets_remove_more() -> None:
    bi = [float(torch.rand(1)) for _ in range(30)]
    cost = smol_cost()
    assert select_depth(plan_bi(bi), cost, 1.0).removed == []
    depths = [len(select_depth(plan_bi(bi), cost, b).removed) for b in (0.95, 0.85, 0.75, 0.6)]
    assert depths == sorted(depths) and depths[0] < depths[-1]


def test_impossible_budget_says_what_would_work() -> None:
    with pytest.raises(ConfigError, match=r"cannot be met.*raise --budget to at least 0\.2"):
        select_depth(plan_bi([0.5] * 30), smol_cost(), 0.1)


def test_keep_first_and_last() -> None:
    bi = [0.0] * 10
    assert removal_order(bi, keep_first=2, keep_last=3) == [2, 3, 4, 5, 6]


class Curve:
    """A quality curve over depth that records which depths were asked for (the search's cost)."""

    def __init__(self, retained_at: dict[int, float]) -> None:
        self.retained_at = retained_at
        self.asked: list[int] = []

    def __call__(self, removed: list[int]) -> dict:
        self.asked.append(len(removed))
        return {"retained": self.retained_at[len(removed)]}


def linear_curve(drop_per_layer: float) -> Curve:
    return Curve({n: max(0.0, 1.0 - drop_per_layer * n) for n in range(31)})


BI = [0.9, 0.2] + [0.05 + 0.001 * i for i in range(27)] + [0.3]


N_BUDGET = len(select_depth(plan_bi(BI), smol_cost(512), 0.75).removed)


def test_floor_met_at_budget_depth_is_confirmed_by_its_neighbour() -> None:
    curve = linear_curve(0.01)
    sel = select_depth(plan_bi(BI), smol_cost(512), 0.75, evaluate=curve, min_quality=0.85)
    assert sel.n_removed == N_BUDGET and curve.asked == [N_BUDGET, N_BUDGET - 1]
    assert sel.latency_met and sel.quality_met
    assert sel.quality == {"retained": 1.0 - 0.01 * N_BUDGET, "retained_fit": 1.0 - 0.01 * N_BUDGET}
    assert "above the floor 0.85" in sel.reason and "monotone fit" in sel.reason
    point = linear_curve(0.01)
    sel = select_depth(plan_bi(BI), smol_cost(512), 0.75, evaluate=point, min_quality=0.85, decide="point")
    assert sel.n_removed == N_BUDGET and point.asked == [N_BUDGET]  # the measurement alone: one evaluation
    assert sel.quality == {"retained": 1.0 - 0.01 * N_BUDGET}


def test_floor_binds_binary_search_finds_deepest_depth_keeping_it() -> None:
    for decide, extra in (("point", 0), ("fit", 2)):
        curve = linear_curve(0.04)  # retains >= 0.85 up to 3 layers
        sel = select_depth(plan_bi(BI), smol_cost(512), 0.75, evaluate=curve, min_quality=0.85, decide=decide)
        assert sel.n_removed == 3
        assert not sel.latency_met and sel.quality_met
        assert len(curve.asked) <= 1 + math.ceil(math.log2(N_BUDGET)) + extra
        assert len(set(curve.asked)) == len(curve.asked)  # no depth measured twice
        assert sel.reason.startswith("LATENCY BUDGET MISSED")
        assert f"--budget {sel.cost_ratio:.3f} would be met" in sel.reason
        assert sel.candidates[4].quality is not None and sel.candidates[4].quality["retained"] < 0.85


class NoisyCurve(Curve):
    """Measured points with a 95% interval of +-0.1 each (about 100 items per task)."""

    def __call__(self, removed: list[int]) -> dict:
        q = super().__call__(removed)
        return {**q, "retained_ci": [q["retained"] - 0.1, q["retained"] + 0.1]}


def test_a_single_lucky_point_at_the_budget_depth_is_not_trusted() -> None:
    # True quality falls ~0.04 per layer; the budget depth measured high by chance, its neighbour did not.
    at = {N_BUDGET: 0.86, N_BUDGET - 1: 0.70, 5: 0.82, 2: 0.93, 3: 0.88, 4: 0.84, 1: 0.97}
    point = select_depth(plan_bi(BI), smol_cost(512), 0.75, evaluate=NoisyCurve(at), min_quality=0.85, decide="point")
    assert point.n_removed == N_BUDGET
    fit = select_depth(plan_bi(BI), smol_cost(512), 0.75, evaluate=NoisyCurve(at), min_quality=0.85)
    assert fit.n_removed == 3 and not fit.latency_met
    budget_row = fit.candidates[N_BUDGET].quality
    assert budget_row is not None and budget_row["retained_fit"] == pytest.approx((0.86 + 0.70) / 2)
    assert "read with its neighbours" in fit.reason
    cautious = select_depth(
        plan_bi(BI), smol_cost(512), 0.75, evaluate=NoisyCurve(at), min_quality=0.85, decide="lower-bound"
    )
    assert cautious.n_removed == 1  # 0.97 - 0.1 is the only lower bound above the floor
    assert "lower end of its 95% interval" in cautious.reason


def test_a_single_unlucky_point_at_the_boundary_is_confirmed_by_the_next_depth() -> None:
    # The binary search meets 8 removed measured low by chance (0.84) and stops at 7; the depth after it says 8 was
    # noise: read together, 8 and 9 keep the floor.
    at = {N_BUDGET: 0.60, 5: 0.90, 7: 0.87, 8: 0.84, 6: 0.88, 9: 0.87}
    assert N_BUDGET == 10
    point = NoisyCurve(at)
    assert (
        select_depth(plan_bi(BI), smol_cost(512), 0.75, evaluate=point, min_quality=0.85, decide="point").n_removed == 7
    )
    curve = NoisyCurve(at)
    sel = select_depth(plan_bi(BI), smol_cost(512), 0.75, evaluate=curve, min_quality=0.85)
    assert sel.n_removed == 9 and sel.quality_met
    assert sorted(curve.asked) == [5, 6, 7, 8, 9, 10]
    assert sel.quality is not None and sel.quality["retained_fit"] == pytest.approx(0.855)
    none = NoisyCurve(at)
    assert select_depth(plan_bi(BI), smol_cost(512), 0.75, evaluate=none, min_quality=0.85, confirm=0).n_removed == 7
    assert 9 not in none.asked


def test_decide_must_be_known() -> None:
    with pytest.raises(ConfigError, match="--decide must be one of fit, lower-bound, point"):
        select_depth(plan_bi(BI), smol_cost(512), 0.75, evaluate=linear_curve(0.01), min_quality=0.85, decide="mean")


def test_floor_allows_nothing() -> None:
    curve = linear_curve(0.5)
    sel = select_depth(plan_bi(BI), smol_cost(512), 0.75, evaluate=curve, min_quality=0.85)
    assert sel.removed == [] and not sel.latency_met
    assert "no layer can be removed" in sel.reason


def test_strict_fails_with_the_table_and_a_budget_that_works() -> None:
    curve = linear_curve(0.04)
    with pytest.raises(BudgetError, match=r"--budget 0\.\d+ would work") as err:
        select_depth(
            plan_bi(BI),
            smol_cost(512),
            0.75,
            evaluate=curve,
            min_quality=0.85,
            strict=True,
            describe=lambda rows: f"TABLE {len(rows)} rows",
        )
    assert "TABLE 29 rows" in str(err.value)


def test_plan_angular_removes_the_closest_block() -> None:
    n = 8
    dist = [[abs(j - i) * 0.1 for j in range(n + 1)] for i in range(n + 1)]
    dist[3][6] = 0.01  # boundaries 3 and 6 nearly identical: layers 3, 4, 5 do little
    plans = plan_angular(dist)
    assert plans[3] == [3, 4, 5]
    assert all(len(p) == k for k, p in enumerate(plans))
    assert all(0 not in p and n - 1 not in p for p in plans)


def hand_active_params(c: dict, i: int) -> int:
    """Parameters decoder layer i of a tiny Qwen2-MoE, Qwen3-MoE or Mixtral uses per token, from its config alone."""
    h, heads, kv_heads = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"]
    head_dim = c.get("head_dim") or h // heads
    q, kv = heads * head_dim, kv_heads * head_dim
    params = 2 * h * q + 2 * h * kv + 2 * h  # q, k, v, o projections and the two norms
    if c["model_type"] == "qwen2_moe":
        params += q + 2 * kv  # q, k, v biases
    if c["model_type"] == "qwen3_moe":
        params += 2 * head_dim  # q and k norms
    step = c.get("decoder_sparse_step") or 1
    sparse = (i + 1) % step == 0 and i not in (c.get("mlp_only_layers") or [])
    if not sparse:
        return params + 3 * h * c["intermediate_size"]
    experts = c.get("num_experts") or c["num_local_experts"]
    inter = c.get("moe_intermediate_size") or c["intermediate_size"]
    params += experts * h  # the router scores every expert
    params += c["num_experts_per_tok"] * 3 * h * inter  # only the routed experts run
    if c.get("shared_expert_intermediate_size"):
        params += 3 * h * c["shared_expert_intermediate_size"] + h  # the shared expert and its gate always run
    return params


@pytest.mark.parametrize("model_type", ["qwen2_moe", "qwen3_moe", "mixtral"])
def test_moe_cost_counts_routed_experts_per_token(make_tiny_model, model_type: str) -> None:  # type: ignore[no-untyped-def]
    import json

    from transformers import AutoModelForCausalLM

    folder = make_tiny_model(model_type)
    config = json.loads((folder / "config.json").read_text())
    cost = CostModel.from_checkpoint(folder, config, "model.layers", context=0)
    n = config["num_hidden_layers"]
    assert cost.layer_flops == [2.0 * hand_active_params(config, i) for i in range(n)]
    # Parameters stay what is stored: every expert, as the loaded model holds them.
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert cost.layer_params == [sum(p.numel() for p in layer.parameters()) for layer in model.model.layers]
    assert cost.full_params == sum(p.numel() for p in model.parameters())
    sparse = [i for i in range(n) if 2.0 * cost.layer_params[i] > cost.layer_flops[i]]
    assert sparse == ([1, 5] if model_type != "mixtral" else list(range(n)))
    with_context = CostModel.from_checkpoint(folder, config, "model.layers", context=64)
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    attention = 4.0 * config["num_attention_heads"] * head_dim * 64
    assert [b - a for a, b in zip(cost.layer_flops, with_context.layer_flops, strict=True)] == [attention] * n


def test_moe_cost_refuses_a_config_without_routing(make_tiny_model) -> None:  # type: ignore[no-untyped-def]
    import json

    from shortgpt_serve.errors import ModelError

    folder = make_tiny_model("mixtral")
    config = json.loads((folder / "config.json").read_text())
    with pytest.raises(ModelError, match="no valid num_experts_per_tok"):
        CostModel.from_checkpoint(folder, {**config, "num_experts_per_tok": None}, "model.layers", context=0)
    with pytest.raises(ModelError, match=r"stores 4 experts but config\.json says 8"):
        CostModel.from_checkpoint(folder, {**config, "num_local_experts": 8}, "model.layers", context=0)
    with pytest.raises(ModelError, match=r"hold MoE experts but config\.json gives no expert count"):
        CostModel.from_checkpoint(folder, {**config, "num_local_experts": None}, "model.layers", context=0)
