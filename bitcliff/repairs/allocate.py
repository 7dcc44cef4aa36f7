"""The global repair allocator: the budget split across modules *and* repairs by the measured loss
each step removes per bit.

Every repair that can be weighed (``Repair.measured_options``: low rank offers its ranks,
restoration its wider widths) offers each module options, each with its exact stored bits and the
loss it is estimated to leave, up to one factor for every module (:mod:`bitcliff.repairs.measure`:
``g · tr(E C Eᵀ)`` after the step).  A module takes at most one option (restored modules get no factors), and choosing one
per module under the budget is the multiple-choice knapsack :func:`bitcliff.knapsack.allocate`
solves: the whole model at once, the steps removing the most loss per bit first.  No layer or
method has a fixed share.

Each chosen option keeps what decided it (the loss it removes per bit, from the measurements),
and the plan's reasons cite those numbers (a test recomputes them).
"""

from __future__ import annotations

import math

from bitcliff.knapsack import allocate
from bitcliff.repairs.measure import Measurements
from bitcliff.repairs.registry import MeasuredOption, PlanContext, Planned, repairs


def allocate_repairs(ctx: PlanContext, measured: Measurements, methods: tuple[str, ...],
                     available: float) -> dict[str, MeasuredOption]:
    """Per module, the option chosen (its ``method`` None: left as it is), their summed cost at
    most ``available`` bits.

    Raises:
        ValueError: a module of the plan that the measurements lack (made on another model), or
            measurements that are not finite and non-negative.
    """
    missing = sorted(set(ctx.modules) - set(measured.modules))
    if missing:
        raise ValueError(f"the measurements lack module {missing[0]}: they were made on another model")
    options = {}
    for name in ctx.modules:
        curve = measured.modules[name]
        numbers = [curve.error, curve.sensitivity, *curve.energy, *curve.widths.values()]
        if not all(math.isfinite(x) and x >= 0 for x in numbers):
            raise ValueError(f"the measurements of {name} hold a negative, NaN or infinite value: measure again")
        keep = MeasuredOption(None, name, 0.0, curve.sensitivity * curve.error, 0, curve.sensitivity * curve.error)
        options[name] = [keep] + [o for method in methods for o in repairs()[method].measured_options(ctx, curve)]
    return allocate(options, available)


def plan_allocated(ctx: PlanContext, measured: Measurements, methods: tuple[str, ...],
                   available: float) -> list[tuple[str, Planned]]:
    """Each repair's share of the plan from :func:`allocate_repairs` among ``methods`` (weighable
    repairs): ``(name, planned)`` for every method that got at least one module."""
    choice = allocate_repairs(ctx, measured, methods, available)
    out = []
    for method in methods:
        chosen = {name: option for name, option in choice.items() if option.method == method}
        if chosen:
            out.append((method, repairs()[method].plan_measured(ctx, chosen)))
    return out
