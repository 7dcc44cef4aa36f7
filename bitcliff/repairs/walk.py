"""The repair walk: decoder layer by decoder layer over calibration windows, each layer of the
quantized model repaired on the inputs of the layers already repaired before it (the
full-precision weights are the targets).

Per layer:

1. The quantized layer runs once per batch, true-sequentially, through the walk GPTQ uses too
   (:class:`~bitcliff.group_walk.GroupWalk`): every batch stops at the input of each share group
   in turn (q/k/v, o, gate/up, down); when all have stopped there, the group's input statistics
   are complete (covariance ``E[x xᵀ]`` and mean, summed over the ranks of a distributed run),
   and the plan's repairs are applied to the group in the registry's order
   (``registry.repairs()``: restoration, GPTQ at more bits on these inputs; sparse outliers;
   low-rank compensation; norm recalibration of the norm that feeds the group, on what the
   compensation left; bias correction); then the batches go
   on through the repaired group.
2. The repaired layer's outputs are the next layer's inputs.

Over several ranks (:mod:`bitcliff.distributed`) every rank walks its share of the calibration
batches and every rank makes the same repair from the summed statistics.

The input covariance counts every position, the first one too: its activations are the attention
sink's, tens of times larger than any other token's, and a quantization that ignores them (a GPTQ
re-solve or low-rank factors fitted without that row) corrupts the sink and with it every token's
attention (docs/repair.md measures it).  The mean input that bias correction uses skips it
(``layers.FIRST_TOKEN``), since its huge values would set the mean alone.
"""

from __future__ import annotations

import time

import torch
from torch import nn
from tqdm.auto import tqdm

from bitcliff.distributed import Ranks
from bitcliff.group_walk import (
    GroupInputs,
    GroupWalk,
    capture_calibration_inputs,
    rank_share,
)
from bitcliff.kernels.cpu import exact_activations
from bitcliff.layers import LayerCalls, find_decoder_layers
from bitcliff.quant.qlinear import QuantLinear
from bitcliff.quant.surgery import quant_config
from bitcliff.repairs.lowrank import output_error
from bitcliff.repairs.plan import RepairPlan
from bitcliff.repairs.registry import GroupRepair, ModuleRepair, WalkRecord, repairs

DEFAULT_BATCH_SIZE = 8


class _LayerRepairer:
    """Repairs the share groups of one decoder layer as the walk reaches them: every repair of the
    plan in turn (``registry.repairs()`` order), on the group's input statistics."""

    def __init__(self, plan: RepairPlan, config, name: str, index: int, fp_layer: nn.Module,
                 record: WalkRecord, states: dict) -> None:
        self.plan, self.config, self.name, self.index = plan, config, name, index
        self.fp_layer, self.record, self.states = fp_layer, record, states
        self.scales: dict[str, torch.Tensor] = {}  # member -> γ its in-flight input still needs
        for method, step in plan.steps.items():
            repairs()[method].start_layer(step, states[method], index)

    def repair(self, layer: nn.Module, inputs: GroupInputs, modules: dict[str, nn.Module],
               weights: tuple[int, int]) -> dict[str, nn.Module]:
        """Repair one group; ``weights``: the group's and those of the layer's groups not yet
        repaired.  Returns the modules now in the members' places."""
        members = inputs.members
        group = GroupRepair(
            layer=layer, name=self.name, index=self.index, members=members, source=inputs.source,
            modules=dict(modules),
            targets={rel: self.fp_layer.get_submodule(rel).weight.detach().float() for rel in members},
            covariance=inputs.statistics.hessian() / 2.0, mean=inputs.mean, statistics=inputs.statistics,  # E[x xᵀ]
            entries={rel: ModuleRepair(f"{self.name}.{rel}", self.index) for rel in members},
            weights=weights[0], layer_weights=weights[1], config=self.config, fp_layer=self.fp_layer,
            record=self.record, scales=self.scales,
        )
        for rel in members:
            group.entries[rel].error_before = output_error(group.targets[rel] - group.weight(rel), group.covariance)
        for method, step in self.plan.steps.items():
            repairs()[method].apply(step, self.states[method], group)
        for rel in members:
            entry = group.entries[rel]
            entry.error_after = output_error(group.targets[rel] - group.weight(rel), group.covariance)
            self.record.modules.append(entry)
            self.record.bits += entry.bits
        return group.modules


# Its forwards feed the repairs' solves, defined on exact products: with the kernel's integer
# activations (AVX-512 builds only) what it writes would depend on the machine's build.
@exact_activations()
def repair_walk(fp_model: nn.Module, q_model: nn.Module, calib_ids: torch.Tensor, plan: RepairPlan,
                batch_size: int = DEFAULT_BATCH_SIZE, progress: bool = True, ranks: Ranks | None = None) -> WalkRecord:
    """Apply ``plan`` to ``q_model`` in place, layer by layer (module docstring).

    Args:
        fp_model: the full-precision model ``q_model`` was quantized from.
        q_model: the quantized model (``QuantLinear`` layers), repaired in place.
        calib_ids: int64 ``[n, T]`` calibration windows.
        plan: what to repair (:func:`bitcliff.repairs.plan.plan_repair`).
        batch_size: windows per forward.
        progress: a tqdm bar over the layers.
        ranks: the processes sharing the walk (each passes the same models and windows, and ends
            with the same repaired model); None for one.
    """
    start = time.perf_counter()
    ranks = ranks or Ranks.single()
    config = quant_config(q_model)
    if config is None:
        raise ValueError("the quantized model carries no QuantConfig: load it with bitcliff.load or quantize it first")
    prefix, q_layers = find_decoder_layers(q_model)
    _, fp_layers = find_decoder_layers(fp_model)
    record = WalkRecord(tokens=int(calib_ids.numel()))
    q_calls: LayerCalls = capture_calibration_inputs(q_model, q_layers, rank_share(calib_ids, batch_size, ranks),
                                                     batch_size)
    q_hidden = q_calls.inputs[0]
    states = {method: {} for method in plan.steps}  # each repair's state over the walk
    groups = None  # found by a probing forward on the first layer, reused while the linears are the same
    for index in tqdm(range(len(q_layers)), desc="repair", unit="layer", disable=not (progress and ranks.writes)):
        layer, name = q_layers[index], f"{prefix}.{index}"
        linears = {rel: m for rel, m in layer.named_modules() if isinstance(m, (QuantLinear, nn.Linear))}
        if groups is not None and {m for g in groups for m in g.members} != set(linears):
            groups = None
        repairer = _LayerRepairer(plan, config, name, index, fp_layers[index], record, states)
        q_hidden, groups = _walk_layer(layer, linears, q_hidden, q_calls.calls[index], repairer, ranks=ranks,
                                       name=name, groups=groups)
    record.seconds = time.perf_counter() - start
    return record


def _walk_layer(layer: nn.Module, linears: dict[str, nn.Module], hidden: list[torch.Tensor], calls,
                repairer: _LayerRepairer, *, ranks: Ranks, name: str, groups):
    """Repair one layer; returns its outputs (the next layer's inputs) and its share groups."""
    walk = GroupWalk(layer, linears, hidden, calls, name=name, ranks=ranks, with_mean=True, groups=groups,
                     input_scale=repairer.scales.get)
    layer_weights = sum(m.in_features * m.out_features for m in linears.values())
    with torch.no_grad():
        for group in walk:
            weights = sum(linears[m].in_features * linears[m].out_features for m in group.members)
            modules = {rel: walk.module(rel) for rel in group.members}
            repaired = repairer.repair(layer, group, modules, (weights, layer_weights))
            for rel, module in repaired.items():
                walk.replace(rel, module)
            layer_weights -= weights  # the next groups share what this one left
    return walk.outputs, walk.groups
