"""Repair planning: which training-free repairs, on which modules, with how many bits, and why,
from a diagnosis, and by default from a measuring pass of what each step buys.

The verdict decides the kind of repair (the seed papers' claim, tested in docs/repair.md):

* **signal degradation** (components work, error accumulates): *compensation*, and precision
  where it pays.  With measurements (``measured``, what ``diagnose_and_repair`` and the command
  line take by default, :data:`ALLOCATOR`) the global allocator (:mod:`bitcliff.repairs.allocate`)
  weighs, module by module across the whole model, 4-bit low-rank factors of every rank against
  re-quantizing the module wider (restoration), by the measured loss each removes per bit; then
  norm recalibration on what they left (free).  Weighing restoration beside low rank, against
  low rank alone (wiki ppl, GPTQ g64): SmolLM2 W3 +0.25 32.49 against 31.60, Gemma-3 W3 +0.25
  29.24 against 30.03, SmolLM2 W2 +0.5 81.08 against 129.40, Gemma-3 W2 +0.5 84.48 against
  130.94: it loses a little once and wins the other three times, by a third at W2.  From the
  diagnosis alone the plan is low rank only, the layers sharing the budget in proportion to how
  much error each adds (``local_update_error``) times its weights (SmolLM2 W3: 32.83; Gemma-3
  W3: 31.86).  Sparse outliers and bias correction are available with ``methods``, not chosen
  (``Repair.auto``): at equal bits 4-bit low-rank factors beat the outliers on every model and
  width measured (SmolLM2 GPTQ W3 +0.25: 33.00 against 33.60 wiki ppl; GPTQ W2 +0.5: 178
  against 198; Gemma-3 GPTQ W3 +0.25: 31.16 against 35.37; docs/repair.md).
* **computation collapse** (components stop functioning early): as for degradation.  The
  seed's answer was structure first, and it lost where it was tested: on SmolLM2 RTN W2 (the
  clean collapse) restoring the collapsed components first and compensating with the rest gave
  ppl 32,478 at +0.5 bits and 1,076 at +1.0, where sparse outliers alone gave 221 and 168 and
  4-bit low-rank factors alone 150 at +0.5 (docs/repair.md).  Structure is still planned from
  the diagnosis alone with ``methods`` (``restore``, no measurements): whole components (a
  layer's attention or MLP) restored to more bits, those that stopped functioning first: local
  F(c) below the verdict's threshold in the early third of the layers, earliest layer first,
  then every other component by ascending F(c).  With measurements restoration is weighed
  module by module instead.
* **mixed**: structure and compensation: from the diagnosis alone, half the budget each (not
  measured against compensation alone yet); with measurements, as for degradation;
  **healthy**: nothing.

With measurements the verdict is a weaker prior than it was: it decides whether to repair and
which repairs may be weighed, and the measurements decide the kind module by module, since the
kind the verdict named lost to the weighed mix wherever both were measured.

Every choice carries its reason, citing the evidence (tests hold the restored components to the
ones the evidence names, and the allocator's steps to the measured gains that chose them).
Costs are exact, in extra bits per quantized weight.

The repairs themselves are the registry's (``registry.repairs()``): each sizes its own share of the
plan; this module only hands out the budget, by the verdict and each repair's kind, and never
names a repair.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from bitcliff.quant.factors import FACTOR_WIDTHS
from bitcliff.repairs.registry import PlanContext, repairs

#: Low-rank settings of older plans (kept for ``RepairPlan.from_dict``).
_LEGACY_LOWRANK = ("lowrank_bits", "rank", "max_rank")
#: Rounds of re-quantizing a module around its low-rank factors: one was the best measured
#: (SmolLM2 GPTQ W3 +0.25, low rank alone: 38.56 / 199.70 with none, 38.31 / 189.09 with one,
#: 39.32 / 189.39 with two; wiki / Canterbury ppl).
REFINE_ROUNDS = 1
#: Width of stored low-rank factors (16: fp16, a PEFT adapter; 2-4: quantized, bitcliff.quant.factors):
#: 4 was the best measured (SmolLM2 GPTQ W3 +0.25, low rank alone: fp16 38.31 / 189.09, 4 bits
#: 33.00 / 154.60, 3 bits 35.64 / 186.97, 2 bits 38.97 / 198.89; wiki / Canterbury ppl).
FACTOR_BITS = 4
#: How ``diagnose_and_repair`` splits the budget: ``measured`` (a measuring pass, then the global
#: allocator, :mod:`bitcliff.repairs.allocate`) or ``diagnosis`` (layer shares by the error each adds).
ALLOCATORS = ("measured", "diagnosis")
ALLOCATOR = "measured"  # better on both models measured (module docstring)


class PlanError(ValueError):
    """A repair that cannot be planned as asked (bad budget, methods, or diagnosis)."""


class BudgetTooSmallError(PlanError):
    """A budget below the cheapest step of every repair asked for."""


def method_names() -> tuple[str, ...]:
    """Every repair's name, in the order a share group is repaired."""
    return tuple(repairs())


@dataclass
class RepairPlan:
    """What to repair, as extra bits per quantized weight.

    Attributes:
        budget: the extra bits per quantized weight allowed.
        verdict: the diagnosis's verdict the plan follows.
        methods: the repairs it uses (names of ``registry.repairs()``), in walk order.
        steps: repair name -> its decisions (what the walk applies: restored modules and their bits,
            corrected bias families, per-layer low-rank bits...).
        reasons: why, citing the diagnosis.
        planned_bits: bits the plan commits (restoration and biases exact; low-rank at most).
        weights: the quantized weights the budget is spread over.
        target: what the diagnosis was made on (model type, layers, fingerprints).
        allocation: how the budget was split: ``{"by": "diagnosis"}`` (shares by the error each
            layer adds) or ``{"by": "measured", ...}`` (the global allocator, with how it measured).
    """

    budget: float
    verdict: str
    methods: tuple[str, ...] = ()
    steps: dict = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)
    planned_bits: float = 0.0
    weights: int = 0
    target: dict = field(default_factory=dict)
    allocation: dict = field(default_factory=lambda: {"by": "diagnosis"})

    # The decisions of the built-in repairs, by name (read-only views of ``steps``).
    @property
    def restore(self) -> dict[str, int]:
        return dict((self.steps.get("restore") or {}).get("modules", {}))

    @property
    def bias_families(self) -> tuple[str, ...]:
        return tuple((self.steps.get("bias") or {}).get("families", ()))

    @property
    def norm(self) -> bool:
        return "norm" in self.steps

    @property
    def lowrank_bits(self) -> dict[int, float]:
        return {int(k): v for k, v in ((self.steps.get("lowrank") or {}).get("layer_bits") or {}).items()}

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "RepairPlan":
        """A plan from :meth:`to_dict` (also the per-method fields plans had before ``steps``)."""
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        known["methods"] = tuple(known.get("methods", ()))
        steps = dict(known.get("steps") or {})
        if "steps" not in data:
            if data.get("norm"):
                steps["norm"] = {}
            if data.get("restore"):
                steps["restore"] = {"modules": dict(data["restore"])}
            if data.get("bias_families"):
                steps["bias"] = {"families": list(data["bias_families"])}
            if data.get("lowrank_bits"):
                steps["lowrank"] = {"layer_bits": {str(k): v for k, v in data["lowrank_bits"].items()},
                                    "rank": data.get("rank"), "max_rank": data.get("max_rank")}
        known["steps"] = steps
        return cls(**known)


def _layer_prefix(modules: dict) -> str:
    for name in modules:
        parts = name.split(".")
        for i, part in enumerate(parts):
            if part.isdigit():
                return ".".join(parts[:i])
    raise PlanError("the diagnosis lists no quantized module inside numbered decoder layers")


def check_budget(budget) -> float:
    """``budget`` as a float; :class:`PlanError` unless it is a finite number of bits >= 0."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not math.isfinite(budget) or budget < 0:
        raise PlanError(f"budget must be a finite number of extra bits per weight >= 0, got {budget!r}")
    return float(budget)


def _structural_share(label: str, methods: tuple[str, ...], forced: bool) -> float:
    """The part of the budget structural repairs get first: what the verdict calls for, or, for
    forced methods, all of it without compensation beside them and half with."""
    kinds = {repairs()[m].kind for m in methods}
    if not forced:
        return {"mixed": 0.5}.get(label, 0.0)  # collapse: compensation measured better (module docstring)
    if "structure" not in kinds:
        return 0.0
    return 1.0 if "compensation" not in kinds else 0.5


def plan_repair(report, budget: float, methods=None, *, rank: int | None = None, max_rank: int | None = None,
                outlier_share: float | None = None, refine_rounds: int = REFINE_ROUNDS,
                factor_bits: int = FACTOR_BITS, measured=None) -> RepairPlan:
    """A repair plan from a diagnosis (``DiagnosisReport`` or its ``to_dict()``).

    Args:
        report: the diagnosis of the quantized model to repair.
        budget: extra bits per quantized weight, counting every stored bit.
        methods: force these repairs (names of :func:`method_names`); None: chosen by the verdict
            among the repairs that are chosen automatically (``Repair.auto``).
        rank: a fixed low-rank rank for every module instead of the measured allocation.
        max_rank: the largest rank of one module (default ``lowrank.MAX_RANK``, below the smallest
            layer width).
        outlier_share: when both sparse outliers and low-rank compensation are planned (``methods``
            forces both), the share of the compensation budget the outliers get first (the rest
            goes to low rank); None: half.
        refine_rounds: low rank: times the module is re-quantized by GPTQ around its factors
            (``W − BA``) and the factors refitted to the new error (alternating refinement,
            CALDERA / LQ-LoRA style); 0 keeps the checkpoint's codes.  One round is the best
            measured (docs/repair.md).
        factor_bits: low rank: the width its factors are stored at, 16 (fp16, a PEFT adapter) or
            2, 3, 4 (quantized with group scales, ``lowrank.safetensors``; about ``16 / bits``
            times the rank for the same bits).
        measured: the measuring pass's :class:`~bitcliff.repairs.measure.Measurements` (or its
            ``to_dict()``) of these models: the weighable repairs' budget is then split across
            modules and repairs by the global allocator (:mod:`bitcliff.repairs.allocate`) instead
            of the diagnosis's shares.
    Raises:
        PlanError: a negative, NaN or too small budget (the message says what the cheapest
            repair would cost), unknown methods, a bad rank, a diagnosis without module list.
    """
    from bitcliff.repairs.lowrank import MAX_RANK  # noqa: PLC0415 - the low-rank repair's default

    data = report if isinstance(report, dict) else report.to_dict()
    budget = check_budget(budget)
    modules = (data.get("meta") or {}).get("modules")
    if not modules:
        raise PlanError("the diagnosis has no module list (meta.modules): re-run `bitcliff diagnose` with this version")
    label = data["verdict"]["label"]
    registry = repairs()
    forced = methods is not None
    methods = tuple(m for m, r in registry.items() if r.auto) if methods is None else tuple(methods)
    unknown = sorted(set(methods) - set(registry))
    if unknown or not methods:
        raise PlanError(f"methods must be a non-empty subset of {tuple(registry)}, got {list(methods)}")
    smallest = min(min(m["in"], m["out"]) for m in modules.values())
    if rank is not None and not (isinstance(rank, int) and 1 <= rank < smallest):
        raise PlanError(f"rank must lie in [1, min(K, N) = {smallest}) for every module, got {rank!r}")
    if max_rank is None:
        max_rank = min(MAX_RANK, smallest - 1)
    if not 1 <= max_rank < smallest:
        raise PlanError(f"max_rank must lie in [1, {smallest}), got {max_rank}")
    if outlier_share is None:
        outlier_share = 0.5 if {"outliers", "lowrank"} <= set(methods) else 1.0
    if not (isinstance(outlier_share, (int, float)) and 0 <= outlier_share <= 1):
        raise PlanError(f"outlier_share must lie in [0, 1], got {outlier_share!r}")
    if isinstance(refine_rounds, bool) or not (isinstance(refine_rounds, int) and refine_rounds >= 0):
        raise PlanError(f"refine_rounds must be a non-negative integer, got {refine_rounds!r}")
    if isinstance(factor_bits, bool) or factor_bits not in FACTOR_WIDTHS:
        raise PlanError(f"factor_bits must be one of {FACTOR_WIDTHS}, got {factor_bits!r}")
    prefix = _layer_prefix(modules)
    weights = sum(m["in"] * m["out"] for m in modules.values())
    total = budget * weights
    plan = RepairPlan(budget=budget, verdict=label, weights=weights, target=_target(data))
    if label == "healthy" and not forced:
        plan.reasons.append("healthy: the quantized model tracks the full-precision one; no repair planned")
        return plan

    ctx = PlanContext(diagnosis=data, modules=modules, prefix=prefix, weights=weights, label=label,
                      options={"rank": rank, "max_rank": max_rank, "outlier_share": outlier_share,
                               "refine_rounds": refine_rounds, "factor_bits": factor_bits})
    structural = _structural_share(label, methods, forced)
    if measured is not None:
        from bitcliff.repairs.measure import Measurements  # noqa: PLC0415 - measure imports the repairs

        measured = Measurements.from_dict(measured) if isinstance(measured, dict) else measured
        made_on = (data.get("meta") or {}).get("fingerprints")
        if made_on and measured.fingerprints and made_on != measured.fingerprints:
            raise PlanError("the measurements were made on other models than the diagnosis: measure these models "
                            "(bitcliff.measure_repairs) or diagnose them again")
        # Every weighable repair the verdict allows is weighed, restoration of single modules
        # included whatever the verdict (module docstring: it wins at W2 and on Gemma-3 W3).
        weighed = tuple(m for m in methods if registry[m].weighable)
        plan.allocation = {"by": "measured", "weighed": list(weighed), "windows": measured.windows,
                           "sensitivity_windows": measured.sensitivity_windows,
                           "seconds": round(measured.seconds, 1)}
    else:
        weighed = ()
    # Free repairs first, then structure (its share, first served), then compensation with the rest;
    # with measurements the weighable repairs last, the allocator splitting what is left among them.
    order = sorted((registry[m] for m in methods if m not in weighed),
                   key=lambda r: (("free", "structure", "compensation").index(r.kind), r.plan_order, r.order))
    spent = 0.0
    for repair in order:
        if repair.kind == "free":
            available = 0.0
        elif repair.kind == "structure":
            if structural <= 0:
                continue
            available = structural * total - spent
        else:
            available = total - spent
        planned = repair.plan(ctx, available)
        if planned is None:
            continue
        ctx.steps[repair.name] = planned.step
        plan.reasons.append(planned.reason)
        spent += planned.bits
    if weighed:
        from bitcliff.repairs.allocate import plan_allocated  # noqa: PLC0415

        for name, planned in plan_allocated(ctx, measured, weighed, max(total - spent, 0.0)):
            ctx.steps[name] = planned.step
            plan.reasons.append(planned.reason)
            spent += planned.bits
    plan.steps = {name: ctx.steps[name] for name in registry if name in ctx.steps}
    plan.methods = tuple(plan.steps)
    plan.planned_bits = spent
    if not plan.methods:
        raise BudgetTooSmallError(_too_small(budget, ctx, methods))
    if spent < 0.99 * total:
        why = (f"no further step of {', '.join(weighed)} fits in what is left" if weighed
               else f"{', '.join(methods)} can use no more on this model")
        plan.reasons.append(f"the plan stores {spent / weights:.4f} of the {budget:g} bits per weight: {why}")
    return plan


def _target(data: dict) -> dict:
    meta = data.get("meta") or {}
    return {"model_type": meta.get("model_type"), "n_layers": meta.get("n_layers"),
            "quantization": (meta.get("quantization") or {}).get("describe"),
            "fingerprints": meta.get("fingerprints")}


def _too_small(budget: float, ctx: PlanContext, methods) -> str:
    costs = [c for c in (repairs()[m].cheapest(ctx) for m in methods) if c is not None]
    least = min(costs) / ctx.weights if costs else float("nan")
    return (f"a budget of {budget:g} bits per weight buys none of {', '.join(methods)}: the cheapest costs "
            f"{least:.2g} bits per weight")
