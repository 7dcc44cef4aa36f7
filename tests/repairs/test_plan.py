"""Planning from a diagnosis: the kind of repair follows the verdict, restoration follows the
evidence it cites, and the budget is honoured."""

from __future__ import annotations

import math

import pytest

from bitcliff.repairs import budget as costs
from bitcliff.repairs.plan import PlanError, RepairPlan, plan_repair


def _diagnosis(label: str, function: list[float], local_error: list[float] | None = None) -> dict:
    """A diagnosis dictionary of a 6-layer model with Llama-shaped modules (K = N = 64)."""
    n = len(function)
    modules = {}
    for layer in range(n):
        for part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            modules[f"model.layers.{layer}.{part}"] = {"in": 64, "out": 64, "bits": 2, "group_size": 32}
    return {
        "verdict": {"label": label, "thresholds": {"early_function": 0.25}},
        "components": {"function": {"local": {"attn": list(function), "mlp": list(function)}}},
        "signal": {"local_update_error": local_error or [0.1] * n},
        "meta": {"modules": modules, "model_type": "llama", "n_layers": n},
    }


def test_collapse_restores_the_components_the_evidence_names_early_layers_first():
    # Layers 0-1 (the early third of 6) stopped functioning; layer 4 is the least functional overall.
    data = _diagnosis("collapse", [0.10, 0.20, 0.60, 0.50, 0.05, 0.70])
    module = costs.width_change_bits(64, 64, (2, 32), (4, 32))
    weights = 6 * 7 * 64 * 64
    plan = plan_repair(data, budget=16.5 * module / weights, methods=["restore"])  # layers 0, 1 (14 modules) and a bit
    restored_layers = sorted({int(name.split(".")[2]) for name in plan.restore})
    assert restored_layers == [0, 1]  # the early, non-functioning ones before layer 4's lower F
    assert len(plan.restore) == 14
    plan = plan_repair(data, budget=17.5 * module / weights, methods=["restore"])  # then layer 4's MLP (3) fits
    assert sorted({int(name.split(".")[2]) for name in plan.restore}) == [0, 1, 4]
    assert set(plan.restore.values()) == {4}
    assert "layer 0 attn: local F(c) 0.10 < 0.25 in the early third" in " ".join(plan.reasons)
    assert plan.planned_bits <= plan.budget * plan.weights + 1e-6


def test_collapse_is_compensated_like_degradation_unless_restoration_is_asked_for():
    data = _diagnosis("collapse", [0.10, 0.20, 0.60, 0.50, 0.05, 0.70])
    plan = plan_repair(data, budget=1.0)
    assert plan.restore == {} and plan.methods == ("lowrank", "norm")
    assert plan.planned_bits == pytest.approx(plan.weights)
    mixed = plan_repair(_diagnosis("mixed", [0.10, 0.20, 0.60, 0.50, 0.05, 0.70]), budget=1.0)
    assert mixed.restore and "lowrank" in mixed.methods  # half each way


def test_degradation_compensates_and_restores_nothing():
    data = _diagnosis("degradation", [0.8] * 6, local_error=[0.1, 0.1, 0.1, 0.4, 0.1, 0.1])
    plan = plan_repair(data, budget=1.0)
    assert plan.restore == {} and plan.norm and plan.bias_families == ()  # bias only when forced
    assert plan.methods == ("lowrank", "norm")  # 4-bit low-rank factors measured best; the norm after them
    assert plan.steps["lowrank"]["factor_bits"] == 4
    assert max(plan.lowrank_bits, key=plan.lowrank_bits.get) == 3  # where the error is added
    assert plan.planned_bits == pytest.approx(plan.weights)
    plan = plan_repair(data, budget=1.0, methods=["norm", "outliers"])
    assert plan.methods == ("outliers", "norm")
    outliers = {int(k): v for k, v in plan.steps["outliers"]["layer_bits"].items()}
    assert max(outliers, key=outliers.get) == 3
    assert plan.planned_bits <= plan.weights


def test_an_outlier_share_splits_compensation_with_low_rank():
    data = _diagnosis("degradation", [0.8] * 6)
    plan = plan_repair(data, budget=1.0, methods=["outliers", "lowrank"], outlier_share=0.25)
    outliers = sum(plan.steps["outliers"]["layer_bits"].values())
    assert outliers == pytest.approx(0.25 * plan.weights)
    assert sum(plan.lowrank_bits.values()) == pytest.approx(0.75 * plan.weights)
    both = plan_repair(data, budget=1.0, methods=["outliers", "lowrank"])  # forced together: half each
    assert sum(both.steps["outliers"]["layer_bits"].values()) == pytest.approx(0.5 * both.weights)
    assert plan_repair(data, budget=1.0).methods == ("lowrank", "norm")  # chosen: no outliers
    with pytest.raises(PlanError, match="outlier_share must lie in"):
        plan_repair(data, budget=1.0, outlier_share=1.5)


def test_restoration_spends_no_more_than_the_budget_and_as_much_as_fits():
    data = _diagnosis("collapse", [0.1] * 6)
    weights = 6 * 7 * 64 * 64
    with pytest.raises(PlanError, match="buys none of restore: the cheapest costs 0.15"):
        plan_repair(data, budget=0.1, methods=["restore"])  # one MLP (3 modules) costs 0.147
    for budget in (0.2, 0.37, 1.0):
        plan = plan_repair(data, budget=budget, methods=["restore"])
        spent = sum(costs.width_change_bits(64, 64, (2, 32), (bits, 32)) for bits in plan.restore.values())
        assert spent <= budget * weights
        next_component = 4 * costs.width_change_bits(64, 64, (2, 32), (4, 32))  # attention: 4 modules
        assert budget * weights - spent < next_component + 3 * costs.width_change_bits(64, 64, (2, 32), (4, 32))


def test_healthy_plans_nothing_and_the_plan_round_trips():
    plan = plan_repair(_diagnosis("healthy", [0.9] * 6), budget=0.5)
    assert plan.methods == () and "no repair planned" in plan.reasons[0]
    plan = plan_repair(_diagnosis("degradation", [0.9] * 6), budget=0.5)
    assert RepairPlan.from_dict(plan.to_dict()) == plan


@pytest.mark.parametrize("budget,message", [
    (-0.1, "budget must be a finite number"), (math.nan, "budget must be a finite number"),
    ("0.2", "budget must be a finite number"),
])
def test_bad_budgets(budget, message):
    with pytest.raises(PlanError, match=message):
        plan_repair(_diagnosis("degradation", [0.9] * 6), budget=budget)


def test_a_budget_too_small_says_what_the_cheapest_repair_costs():
    with pytest.raises(PlanError, match=r"buys none of lowrank: the cheapest costs 0.\d+ bits per weight"):
        plan_repair(_diagnosis("degradation", [0.9] * 6), budget=1e-4, methods=["lowrank"])


def test_bad_methods_and_ranks():
    data = _diagnosis("degradation", [0.9] * 6)
    with pytest.raises(PlanError, match="methods must be a non-empty subset"):
        plan_repair(data, 0.5, methods=["quantum"])
    with pytest.raises(PlanError, match=r"rank must lie in \[1, min\(K, N\) = 64\)"):
        plan_repair(data, 0.5, rank=64)
    with pytest.raises(PlanError, match="no module list"):
        plan_repair({**data, "meta": {}}, 0.5)


def test_a_budget_beyond_what_lowrank_can_store_is_planned_as_it_will_be_spent():
    # Every module K = N = 64: max rank 63, fp16 factors store 16 * 63 * 128 bits per 4096 weights.
    cap = 16 * 63 * 128 / 4096
    data = _diagnosis("degradation", [0.8] * 6, local_error=[0.1, 0.1, 0.1, 0.4, 0.1, 0.1])
    plan = plan_repair(data, budget=100.0, methods=["lowrank"], factor_bits=16)
    assert plan.planned_bits / plan.weights == pytest.approx(cap)  # not 100: it cannot store more
    reasons = " ".join(plan.reasons)
    assert f"low-rank compensation with {cap:.4f} bits/weight" in reasons
    assert "that is all it can store: rank 63 on every module" in reasons
    assert f"the plan stores {cap:.4f} of the 100 bits per weight: lowrank can use no more" in reasons


def test_what_one_layer_cannot_store_goes_to_the_others():
    # Layer 3 adds 4x the error, so its proportional share (20 * 6 * 0.4 / 0.9 = 53 bits per
    # weight) passes what it can store (31.5): it gets its cap and the others share the rest.
    cap_bits = 7 * 16 * 63 * 128
    data = _diagnosis("degradation", [0.8] * 6, local_error=[0.1, 0.1, 0.1, 0.4, 0.1, 0.1])
    plan = plan_repair(data, budget=20.0, methods=["lowrank"], factor_bits=16)
    assert plan.lowrank_bits[3] == pytest.approx(cap_bits)
    assert plan.planned_bits == pytest.approx(20.0 * plan.weights)
    assert all(plan.lowrank_bits[k] < cap_bits for k in (0, 1, 2, 4, 5))
