"""A new repair is one class in one file: the planner, the walk, the bit count and the command
line pick it up from the registry without being told its name."""

from __future__ import annotations

import copy

import pytest
import torch

import bitcliff
from bitcliff.cli.repair import parse_methods
from bitcliff.diagnosis.run import DiagnoseOptions
from bitcliff.quant.qlinear import QuantLinear
from bitcliff.repairs.budget import FP16_BITS
from bitcliff.repairs.lowrank import lowrank_bits
from bitcliff.repairs.registry import (
    GroupRepair,
    PlanContext,
    Planned,
    Repair,
    register,
    repairs,
    unregister,
)


class OutputScale(Repair):
    """A toy repair: one fp16 scalar per module (here 1.0, so the model is unchanged), 16 bits each."""

    name, kind, order, plan_order, auto = "output_scale", "compensation", 25, 5, False

    def plan(self, ctx: PlanContext, available: float) -> Planned | None:
        cost = FP16_BITS * len(ctx.modules)
        if cost > available:
            return None
        return Planned({"modules": sorted(ctx.modules)}, cost, f"one output scale per module ({len(ctx.modules)})")

    def cheapest(self, ctx: PlanContext) -> float:
        return FP16_BITS * len(ctx.modules)

    def start_layer(self, step: dict, state: dict, index: int) -> None:
        state.setdefault("layers", []).append(index)

    def apply(self, step: dict, state: dict, group: GroupRepair) -> None:
        for rel in group.members:
            if f"{group.name}.{rel}" in step["modules"] and isinstance(group.modules[rel], QuantLinear):
                group.entries[rel].bits += FP16_BITS
                state["groups"] = state.get("groups", 0) + 1


@pytest.fixture
def toy_repair():
    register(OutputScale())
    yield
    unregister("output_scale")


def test_the_built_in_repairs_are_found_in_walk_order():
    assert list(repairs()) == ["restore", "outliers", "lowrank", "norm", "bias"]
    assert {r.kind for r in repairs().values()} == {"free", "structure", "compensation"}


def test_a_registered_repair_is_planned_walked_counted_and_accepted_by_the_cli(toy_repair):
    from repair_fixtures import repair_setup

    fp, q, calib = repair_setup()
    evaluation = torch.randint(0, 128, (6, 32), generator=torch.Generator().manual_seed(2))
    report = bitcliff.diagnose(fp, q, evaluation, options=DiagnoseOptions.fast(), progress=False)
    assert parse_methods("output_scale,lowrank") == ["output_scale", "lowrank"]
    plan = bitcliff.plan_repair(report, budget=0.5, methods=["output_scale", "lowrank"])
    assert plan.methods == ("lowrank", "output_scale")  # walk order: by `order`
    assert "one output scale per module (14)" in plan.reasons
    result = bitcliff.repair(fp, copy.deepcopy(q), calib, plan, progress=False)
    entries = result.record.modules
    assert len(entries) == 14 and all(m.bits >= FP16_BITS for m in entries)  # every module got its scale
    sizes = {name: (m.in_features, m.out_features) for name, m in q.named_modules() if isinstance(m, QuantLinear)}
    low_rank = sum(lowrank_bits(m.rank, *sizes[m.module], plan.steps["lowrank"]["factor_bits"])
                   for m in entries if m.rank)
    assert low_rank > 0 and result.record.bits == pytest.approx(FP16_BITS * 14 + low_rank)
    with pytest.raises(bitcliff.repairs.plan.PlanError, match="buys none of output_scale"):
        bitcliff.plan_repair(report, budget=1e-9, methods=["output_scale"])
