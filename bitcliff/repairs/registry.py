"""The repairs bitcliff knows, and the contract each one fulfils: one file per repair.

A repair is a :class:`Repair` defined as ``REPAIR`` in a module of this package (``bias``,
``lowrank``, ``norm``, ``restore``...); :func:`repairs` finds them all, so that the planner
(``plan.py``), the walk (``walk.py``), the costs in ``repair.json`` and the command line (``--methods``)
know a new repair as soon as its file exists.  None of them names a repair.

A repair declares:

* ``name``, and its ``kind``: ``free`` (stores nothing), ``structure`` (replaces what stopped
  working: a diagnosis of computation collapse gives these the budget first) or ``compensation``
  (corrects what still works: what degradation calls for, and what structure leaves);
* ``order``: its place in a share group's repair (restoration first, then compensation, norm
  recalibration on what compensation left, bias correction last);
* how the plan sizes it: :meth:`Repair.plan` spends at most the bits it is offered and says why,
  citing the diagnosis; :meth:`Repair.cheapest` is its smallest step, for the message when a
  budget buys nothing; a ``weighable`` repair also offers each module measured options
  (:meth:`Repair.measured_options`), which the global allocator weighs against every other
  repair's, and turns those chosen into its step (:meth:`Repair.plan_measured`);
* how the walk applies it: :meth:`Repair.apply`, once per share group of each decoder layer, on
  that group's input statistics (:class:`GroupRepair`), after :meth:`Repair.start_layer`.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field

import torch
from torch import nn

from bitcliff.layers import component_of
from bitcliff.quant.config import QuantConfig
from bitcliff.quant.qlinear import QuantLinear
from bitcliff.statistics import HessianAccumulator

KINDS = ("free", "structure", "compensation")


@dataclass
class PlanContext:
    """What a repair plans from.

    Attributes:
        diagnosis: the diagnosis (``DiagnosisReport.to_dict()``).
        modules: quantized module name -> ``{"in", "out", "bits", "group_size"}`` (its ``meta.modules``).
        prefix: the decoder layers' path (``model.layers``).
        weights: the quantized weights the budget is spread over.
        label: the verdict.
        options: settings of particular repairs (``rank``, ``max_rank`` for low rank).
        steps: the decisions of the repairs planned so far, by name.
    """

    diagnosis: dict
    modules: dict
    prefix: str
    weights: int
    label: str
    options: dict = field(default_factory=dict)
    steps: dict = field(default_factory=dict)

    def replaced(self) -> set[str]:
        """Modules the repairs planned so far replace whole (others leave them alone)."""
        return {name for repair_name, step in self.steps.items() for name in repairs()[repair_name].replaces(step)}

    def compensable(self):
        """``(name, layer, module)`` of every module in a decoder layer's component that no repair
        planned so far replaces: what compensation may correct."""
        replaced = self.replaced()
        for name, m in self.modules.items():
            component = component_of(name, self.prefix)
            if component is not None and name not in replaced:
                yield name, component[0], m

    def error_shares(self) -> tuple[dict[int, int], dict[int, float]]:
        """Per decoder layer, its compensable weights, and its share of a compensation budget:
        the error it adds (the diagnosis's local error relative to its update) times its weights."""
        layer_weights: dict[int, int] = {}
        for _, layer, m in self.compensable():
            layer_weights[layer] = layer_weights.get(layer, 0) + m["in"] * m["out"]
        local = self.diagnosis["signal"]["local_update_error"]
        share = {layer: w * max(float(local[layer] or 0.0), 1e-6) for layer, w in layer_weights.items()}
        return layer_weights, share


@dataclass
class Planned:
    """A repair's share of a plan: its decisions (JSON-able, read back by :meth:`Repair.apply`),
    the bits they commit (at most), and why."""

    step: dict
    bits: float
    reason: str


@dataclass(frozen=True)
class MeasuredOption:
    """One way to repair one module, as the global allocator (:mod:`bitcliff.repairs.allocate`)
    weighs it.

    Attributes:
        method: the repair (None: the module left as it is); module: its full name.
        cost: the bits it stores.
        error: the loss it is estimated to leave, up to one factor for every module
            (``g · tr(E C Eᵀ)``, from the measurements); before: the same with no repair.
        decision: what the repair's step records (low rank: the rank; restoration: the width).
    """

    method: str | None
    module: str
    cost: float
    error: float
    decision: int
    before: float

    @property
    def gain_per_bit(self) -> float:
        """Loss removed per stored bit: what the allocator ranks steps by."""
        return (self.before - self.error) / self.cost if self.cost > 0 else 0.0


def cite(chosen: dict[str, MeasuredOption], describe, top: int = 5) -> str:
    """The ``top`` chosen options that remove the most loss per bit, as ``what (loss per kbit)``:
    the evidence a plan's reason cites (``describe(option)``: the step in words)."""
    ranked = sorted(chosen.values(), key=lambda o: -o.gain_per_bit)[:top]
    return ", ".join(f"{describe(o)} ({o.gain_per_bit * 1e3:.3g} per kbit)" for o in ranked)


@dataclass
class ModuleRepair:
    """What the walk did to one module (one entry of ``repair.json``).

    Attributes:
        module: full name.
        layer: decoder layer index.
        restored_bits: bits it was re-quantized to (16: full precision), or None.
        rank: rank of its low-rank factors (0: none).
        outliers: weights kept exact by sparse corrections (0: none).
        bias: whether its bias was corrected.
        error_before, error_after: its output error ``E‖y_fp − y_q‖²`` on the repaired model's
            inputs (summed over outputs, mean over tokens) before and after the repairs.
        bits: the bits its repairs store.
    """

    module: str
    layer: int
    restored_bits: int | None = None
    rank: int = 0
    outliers: int = 0
    bias: bool = False
    error_before: float = 0.0
    error_after: float = 0.0
    bits: float = 0.0


@dataclass
class WalkRecord:
    """Everything the walk did: per module, per norm, the bits spent, and timings."""

    modules: list[ModuleRepair] = field(default_factory=list)
    norms: list[dict] = field(default_factory=list)
    bits: float = 0.0
    seconds: float = 0.0
    tokens: int = 0


def effective_weight(module: nn.Module) -> torch.Tensor:
    """The effective fp32 ``[N, K]`` weight a linear applies (codes plus any low-rank term)."""
    if isinstance(module, QuantLinear):
        return module.effective_weight()
    return module.weight.detach().float()


@dataclass
class GroupRepair:
    """One share group of one decoder layer, as the walk hands it to each repair in turn.

    The repairs read and update it: a norm recalibration rescales ``covariance``, ``mean`` and
    ``targets`` (and asks, through ``scales``, that the group's in-flight inputs be rescaled too);
    a restoration replaces ``modules[rel]``.

    Attributes:
        layer: the decoder layer module; ``name``: its full name; ``index``: its number.
        members: the group's linears (names relative to the layer), reading one input.
        source: the norm (relative name) whose output that input is, or None.
        modules: member -> the module currently in its place.
        targets: member -> fp32 ``[N, K]`` full-precision weight (in the group's current input scale).
        covariance: fp32 ``[K, K]`` ``E[x xᵀ]`` of the group's input over every position.
        mean: fp32 ``[K]`` mean input, the first position left out.
        statistics: the accumulator behind ``covariance`` (its ``hessian()`` is ``2 E[x xᵀ]``).
        entries: member -> its :class:`ModuleRepair`.
        weights: the group's weights; ``layer_weights``: those of the layer's groups not yet repaired.
        config: the model's quantization settings.
        fp_layer: the full-precision layer.
        record: the walk's record.
        scales: member -> per-channel scale its in-flight input still needs (set by norm recalibration).
    """

    layer: nn.Module
    name: str
    index: int
    members: list[str]
    source: str | None
    modules: dict
    targets: dict
    covariance: torch.Tensor
    mean: torch.Tensor
    statistics: HessianAccumulator
    entries: dict
    weights: int
    layer_weights: int
    config: QuantConfig
    fp_layer: nn.Module
    record: WalkRecord
    scales: dict

    def weight(self, rel: str) -> torch.Tensor:
        return effective_weight(self.modules[rel])


class Repair:
    """One training-free repair (see the module docstring); subclass and define ``REPAIR``."""

    name: str = ""
    kind: str = "compensation"
    order: int = 50
    auto: bool = True  # chosen by the verdict when the user forces no methods
    weighable: bool = False  # offers measured options to the global allocator

    def plan(self, ctx: PlanContext, available: float) -> Planned | None:
        """Decide where and how much, within ``available`` bits; None when it buys nothing."""
        raise NotImplementedError

    def cheapest(self, ctx: PlanContext) -> float | None:
        """Bits of the smallest step this repair can take (None: it costs nothing)."""
        return None

    def replaces(self, step: dict) -> set[str]:
        """Full names of the modules ``step`` replaces whole."""
        return set()

    def measured_options(self, ctx: PlanContext, curve) -> list[MeasuredOption]:
        """A weighable repair's options for one module, from its
        :class:`~bitcliff.repairs.measure.ModuleCurve`: their exact bits and the loss each leaves."""
        return []

    def plan_measured(self, ctx: PlanContext, chosen: dict[str, MeasuredOption]) -> Planned:
        """This repair's step from the options the allocator chose for it (module name -> option),
        its reason citing their measured gains."""
        raise NotImplementedError

    def start_layer(self, step: dict, state: dict, index: int) -> None:
        """Before the walk reaches decoder layer ``index`` (``state``: this repair's, kept over the walk)."""

    def apply(self, step: dict, state: dict, group: GroupRepair) -> None:
        """Repair one share group."""
        raise NotImplementedError


_REPAIRS: dict[str, Repair] = {}


def repairs() -> dict[str, Repair]:
    """Every repair, by name, in the order a share group is repaired: each ``REPAIR`` of the modules
    of this package (found on first use: those modules import this one), and any :func:`register` ed."""
    if not _REPAIRS:
        package = importlib.import_module(__package__)
        for info in pkgutil.iter_modules(package.__path__):
            repair = getattr(importlib.import_module(f"{__package__}.{info.name}"), "REPAIR", None)
            if isinstance(repair, Repair):
                _add(repair)
    return _REPAIRS


def _add(repair: Repair) -> None:
    if repair.kind not in KINDS:
        raise ValueError(f"repair {repair.name!r}: kind must be one of {KINDS}, got {repair.kind!r}")
    entries = {**_REPAIRS, repair.name: repair}
    _REPAIRS.clear()
    _REPAIRS.update(sorted(entries.items(), key=lambda kv: (kv[1].order, kv[0])))


def register(repair: Repair) -> None:
    """Add a repair defined outside this package (it takes its place by ``order``)."""
    repairs()
    _add(repair)


def unregister(name: str) -> None:
    repairs().pop(name, None)
