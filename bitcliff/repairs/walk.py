"""The repair walk: decoder layer by decoder layer over calibration windows, each layer of the
quantized model repaired on the inputs of the layers already repaired before it (the
full-precision weights are the targets).

Per layer:

1. The quantized layer runs once per batch (:class:`~bitcliff.layers.SuspendedForwards`).  Every
   batch stops at the input of each share group in turn (q/k/v, o, gate/up, down); when all have
   stopped there, the group's input statistics are complete (covariance ``E[x xᵀ]`` through a
   :class:`~bitcliff.quant.gptq.HessianAccumulator`, and mean), and the plan's repairs are applied
   to the group in the registry's order (``registry.repairs()``: restoration, GPTQ at more bits on
   these inputs; norm recalibration of the norm that feeds the group; low-rank compensation; bias
   correction); then the batches go on through the repaired group.  Each linear sits in a :class:`_Slot` while the layer is walked, so that a restored
   module can replace it even while suspended forwards are inside its call.
2. The repaired layer's outputs are the next layer's inputs.

Over several ranks (:mod:`bitcliff.distributed`) every rank walks its share of the calibration
batches; at each group the input statistics are summed over the ranks (by the group's owner, in
rank order) and every rank makes the same repair from them.

The input covariance counts every position, the first one too: its activations are the attention
sink's, tens of times larger than any other token's, and a quantization that ignores them (a GPTQ
re-solve or low-rank factors fitted without that row) corrupts the sink and with it every token's
attention: restoring all of SmolLM2's W3 modules to 4 bits without it gave ppl 40 where a direct
W4 GPTQ gives 28.  The mean input that bias correction uses skips it
(``diagnosis.fp_record.FIRST_TOKEN``), since its huge values would set the mean alone.
"""

from __future__ import annotations

import time

import torch
from torch import nn
from tqdm.auto import tqdm

from bitcliff.diagnosis.fp_record import FIRST_TOKEN
from bitcliff.distributed import Ranks
from bitcliff.layers import (
    LayerCalls,
    SuspendedForwards,
    find_decoder_layers,
    removing,
    share_groups,
)
from bitcliff.quant.gptq import HessianAccumulator, summed_over_ranks
from bitcliff.quant.gptq_model import capture_calibration_inputs, rank_share
from bitcliff.quant.qlinear import QuantLinear
from bitcliff.quant.surgery import quant_config, set_submodule
from bitcliff.repairs.lowrank import output_error
from bitcliff.repairs.plan import RepairPlan
from bitcliff.repairs.registry import GroupRepair, ModuleRepair, WalkRecord, repairs

DEFAULT_BATCH_SIZE = 8


class _Slot(nn.Module):
    """Holds one linear of the layer being walked; a repair swaps ``inner``."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)


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

    def repair(self, layer: nn.Module, members: list[str], source: str | None, slots: dict[str, _Slot],
               acc: HessianAccumulator, mean: torch.Tensor, weights: tuple[int, int]) -> None:
        """Repair one group; ``weights``: the group's and those of the layer's groups not yet repaired."""
        group = GroupRepair(
            layer=layer, name=self.name, index=self.index, members=members, source=source,
            modules={rel: slots[rel].inner for rel in members},
            targets={rel: self.fp_layer.get_submodule(rel).weight.detach().float() for rel in members},
            covariance=acc.hessian() / 2.0, mean=mean, statistics=acc,  # E[x xᵀ]
            entries={rel: ModuleRepair(f"{self.name}.{rel}", self.index) for rel in members},
            weights=weights[0], layer_weights=weights[1], config=self.config, fp_layer=self.fp_layer,
            record=self.record, scales=self.scales,
        )
        for rel in members:
            group.entries[rel].error_before = output_error(group.targets[rel] - group.weight(rel), group.covariance)
        for method, step in self.plan.steps.items():
            repairs()[method].apply(step, self.states[method], group)
            for rel in members:  # a repair may have put another module in a member's place
                slots[rel].inner = group.modules[rel]
        for rel in members:
            entry = group.entries[rel]
            entry.error_after = output_error(group.targets[rel] - group.weight(rel), group.covariance)
            self.record.modules.append(entry)
            self.record.bits += entry.bits


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
    for index in tqdm(range(len(q_layers)), desc="repair", unit="layer", disable=not (progress and ranks.writes)):
        layer, name = q_layers[index], f"{prefix}.{index}"
        linears = {rel: m for rel, m in layer.named_modules() if isinstance(m, (QuantLinear, nn.Linear))}
        repairer = _LayerRepairer(plan, config, name, index, fp_layers[index], record, states)
        q_hidden = _walk_layer(layer, linears, q_hidden, q_calls.calls[index], repairer, ranks, name)
    record.seconds = time.perf_counter() - start
    return record


def _walk_layer(layer: nn.Module, linears: dict[str, nn.Module], hidden: list[torch.Tensor], calls,
                repairer: _LayerRepairer, ranks: Ranks, name: str) -> list[torch.Tensor]:
    slots = {rel: _Slot(module) for rel, module in linears.items()}
    for rel, slot in slots.items():
        set_submodule(layer, rel, slot)
    try:
        groups = share_groups(layer, slots, hidden[0], calls[0])
        layer_weights = sum(m.in_features * m.out_features for m in linears.values())
        accs = {g.members[0]: HessianAccumulator(linears[g.members[0]].in_features) for g in groups}
        means = {g.members[0]: torch.zeros(linears[g.members[0]].in_features, dtype=torch.float64) for g in groups}
        counts = {g.members[0]: 0 for g in groups}
        owners = dict(zip((g.members[0] for g in groups),
                          ranks.owners([float(linears[g.members[0]].in_features) ** 2 for g in groups])))
        forwards = SuspendedForwards(layer, hidden, calls)

        def first_hook(rel):
            def hook(module, args):
                accs[rel].add(args[0])  # every position: the attention sink's outputs must stay right
                x = args[0][:, FIRST_TOKEN:]  # ... but its huge activations would set the mean alone
                counts[rel] += x.shape[0] * x.shape[1]
                means[rel] += x.detach().reshape(-1, x.shape[-1]).double().sum(0)
                forwards.suspend()
                return _scaled(rel, args)

            return hook

        def member_hook(rel):
            return lambda module, args: _scaled(rel, args)

        def _scaled(rel, args):
            gamma = repairer.scales.get(rel)
            return None if gamma is None else (args[0] * gamma.to(args[0]), *args[1:])

        handles = []
        for g in groups:
            handles.append(slots[g.members[0]].register_forward_pre_hook(first_hook(g.members[0])))
            handles += [slots[m].register_forward_pre_hook(member_hook(m)) for m in g.members[1:]]
        try:
            with removing(handles), torch.no_grad():
                for g in groups:
                    forwards.advance()  # every batch is now parked at this group's input
                    head = g.members[0]
                    acc = summed_over_ranks(accs[head], ranks, owners[head], f"{name}.{head}")
                    total, count = _summed_mean(ranks, means[head], counts[head], owners[head], f"{name}.{head}")
                    mean = (total / max(count, 1)).float()
                    weights = sum(linears[m].in_features * linears[m].out_features for m in g.members)
                    repairer.repair(layer, g.members, g.source, slots, acc, mean, (weights, layer_weights))
                    layer_weights -= weights  # the next groups share what this one left
                    acc.release()
                forwards.advance()
        finally:
            forwards.close()
        return forwards.outputs
    finally:
        for rel, slot in slots.items():
            set_submodule(layer, rel, slot.inner)


def _summed_mean(ranks: Ranks, total: torch.Tensor, count: int, owner: int, what: str) -> tuple[torch.Tensor, int]:
    """A float64 ``[K]`` sum of inputs and its token count, summed over the ranks in rank order."""
    if not ranks.distributed:
        return total, count
    gathered = ranks.gather(count, [total], owner, f"summing the mean input of {what}")
    message = (None, None)
    if gathered is not None:
        message = (sum(c for c, _ in gathered), [sum((t for _, (t,) in gathered[1:]), gathered[0][1][0])])
    count, (total,) = ranks.broadcast(*message, src=owner, what=f"sending the mean input of {what}")
    return total, count
