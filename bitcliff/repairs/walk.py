"""The repair walk: decoder layer by decoder layer over calibration windows, each layer of the
quantized model repaired on the inputs of the layers already repaired before it (the
full-precision weights are the targets).

Per layer:

1. The quantized layer runs once per batch (:class:`~bitcliff.layers.SuspendedForwards`).  Every
   batch stops at the input of each share group in turn (q/k/v, o, gate/up, down); when all have
   stopped there, the group's input statistics are complete (covariance ``E[x xᵀ]`` through a
   :class:`~bitcliff.quant.gptq.HessianAccumulator`, and mean), and the group is repaired in this
   order: restoration (GPTQ at more bits on these inputs), norm recalibration (the norm that feeds
   the group), low-rank compensation, bias correction; then the batches go on through the repaired
   group.  Each linear sits in a :class:`_Slot` while the layer is walked, so that a restored
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
from dataclasses import dataclass, field

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
from bitcliff.repairs import budget as costs
from bitcliff.repairs.bias import bias_shift
from bitcliff.repairs.lowrank import lowrank_solution, output_error, whitening
from bitcliff.repairs.norm import fold_into_norm, group_error, norm_scales
from bitcliff.repairs.plan import BIAS_FAMILIES, RANK_STEP, RepairPlan
from bitcliff.repairs.restore import restore_module

DEFAULT_BATCH_SIZE = 8


@dataclass
class ModuleRepair:
    """What the walk did to one module (one entry of ``repair.json``).

    Attributes:
        module: full name.
        layer: decoder layer index.
        restored_bits: bits it was re-quantized to (16: full precision), or None.
        rank: rank of its low-rank factors (0: none).
        bias: whether its bias was corrected.
        error_before, error_after: its output error ``E‖y_fp − y_q‖²`` on the repaired model's
            inputs (summed over outputs, mean over tokens) before and after the repairs.
        bits: the bits its repairs store.
    """

    module: str
    layer: int
    restored_bits: int | None = None
    rank: int = 0
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


class _Slot(nn.Module):
    """Holds one linear of the layer being walked; a repair swaps ``inner``."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)


def _weight(module: nn.Module) -> torch.Tensor:
    """The effective fp32 ``[N, K]`` weight a linear applies."""
    if isinstance(module, QuantLinear):
        return module.effective_weight()
    return module.weight.detach().float()


def _family(rel: str) -> str | None:
    return next((short for short, attribute in BIAS_FAMILIES.items() if rel.startswith(attribute + ".")), None)


class _LayerRepairer:
    """Repairs the share groups of one decoder layer as the walk reaches them."""

    def __init__(self, plan: RepairPlan, config, name: str, index: int, fp_layer: nn.Module,
                 record: WalkRecord, carried: float) -> None:
        self.plan, self.config, self.name, self.index = plan, config, name, index
        self.fp_layer, self.record = fp_layer, record
        self.scales: dict[str, torch.Tensor] = {}  # member -> γ its in-flight input still needs
        # Low-rank bits this layer may still spend: its share plus what earlier layers left unspent.
        self.budget = plan.lowrank_bits.get(index, 0.0) + carried if index in plan.lowrank_bits else carried

    def repair(self, layer: nn.Module, members: list[str], source: str | None, slots: dict[str, _Slot],
               acc: HessianAccumulator, mean: torch.Tensor, group_weights: int, layer_weights: int) -> None:
        covariance = acc.hessian() / 2.0  # E[x xᵀ]
        targets = {rel: self.fp_layer.get_submodule(rel).weight.detach().float() for rel in members}
        entries = {rel: ModuleRepair(f"{self.name}.{rel}", self.index) for rel in members}
        for rel in members:
            entries[rel].error_before = output_error(targets[rel] - _weight(slots[rel].inner), covariance)
            full = f"{self.name}.{rel}"
            if full in self.plan.restore:
                self._restore(rel, full, slots, targets[rel], acc, entries[rel])
        if self.plan.norm and source is not None:
            gamma = self._recalibrate_norm(layer, source, members, slots, targets, covariance)
            if gamma is not None:
                covariance = covariance * gamma[:, None] * gamma[None, :]
                mean = mean * gamma
                targets = {rel: w / gamma.float()[None, :] for rel, w in targets.items()}
                self.scales.update({rel: gamma.float() for rel in members})
        if self.budget > 0:
            share = self.budget * group_weights / max(layer_weights, 1)
            self.budget -= self._lowrank(members, slots, targets, covariance, share, entries)
        for rel in members:
            module = slots[rel].inner
            if _family(rel) in self.plan.bias_families and isinstance(module, QuantLinear):
                shift = bias_shift(targets[rel], _weight(module), mean)
                old = module.bias.float() if module.bias is not None else torch.zeros_like(shift)
                if module.bias is None:
                    entries[rel].bits += costs.bias_bits(module.out_features)
                module.set_bias((old + shift).to(torch.float16))
                entries[rel].bias = True
            entries[rel].error_after = output_error(targets[rel] - _weight(slots[rel].inner), covariance)
        for rel in members:
            self.record.modules.append(entries[rel])
            self.record.bits += entries[rel].bits

    def _restore(self, rel, full, slots, target, acc, entry) -> None:
        old = slots[rel].inner
        bits = self.plan.restore[full]
        if not isinstance(old, QuantLinear):
            return
        bias = old.bias.float() if old.bias is not None else None
        slots[rel].inner = restore_module(full, target, bias, acc.hessian(), self.config, bits)
        entry.restored_bits = bits
        entry.bits += costs.restore_bits(old.in_features, old.out_features, (old.bits, old.group_size),
                                         (bits, self.config.group_size))

    def _recalibrate_norm(self, layer, source, members, slots, targets, covariance) -> torch.Tensor | None:
        norm = layer.get_submodule(source)
        quantized = [_weight(slots[rel].inner) for rel in members]
        weights = [targets[rel] for rel in members]
        gamma = norm_scales(weights, quantized, covariance)
        before, after = group_error(weights, quantized, covariance), group_error(weights, quantized, covariance, gamma)
        if not after < before:
            return None
        fold_into_norm(norm, gamma)
        self.record.norms.append({"norm": f"{self.name}.{source}", "feeds": [f"{self.name}.{m}" for m in members],
                                  "error_before": before, "error_after": after})
        return gamma

    def _lowrank(self, members, slots, targets, covariance, share: float, entries) -> float:
        """Spend up to ``share`` bits on the group's low-rank factors; returns the bits spent."""
        solutions, energy = {}, {}
        shared = whitening(covariance)  # one factorisation for the whole group
        for rel in members:
            module = slots[rel].inner
            if not isinstance(module, QuantLinear) or f"{self.name}.{rel}" in self.plan.restore:
                continue
            limit = min(self.plan.max_rank, min(module.in_features, module.out_features) - 1)
            if limit >= 1:
                solutions[rel] = (module, lowrank_solution(targets[rel] - _weight(module), covariance, limit, root=shared))
                energy[rel] = max(output_error(targets[rel], covariance), 1e-30)  # E‖W x‖²
        ranks = {rel: 0 for rel in solutions}
        spent = 0.0
        if self.plan.rank is not None:  # one rank everywhere, as far as the share allows
            for rel, (module, _) in solutions.items():
                cost = costs.lowrank_bits(self.plan.rank, module.in_features, module.out_features)
                if spent + cost <= share + 1e-6:
                    ranks[rel], spent = self.plan.rank, spent + cost
        else:  # greedy on the measured relative output error removed per bit, RANK_STEP ranks at a time
            while True:
                best, best_gain = None, 0.0
                for rel, (module, solution) in solutions.items():
                    r = ranks[rel]
                    step = min(RANK_STEP, solution.a.shape[0] - r)
                    cost = costs.lowrank_bits(step, module.in_features, module.out_features)
                    if step <= 0 or spent + cost > share:
                        continue
                    # output error removed relative to the output itself: what the next norm sees
                    gain = (solution.remaining(r) - solution.remaining(r + step)) / energy[rel]
                    gain = gain * (module.in_features * module.out_features) / cost
                    if gain > best_gain:
                        best, best_gain = rel, gain
                if best is None:
                    break
                module, solution = solutions[best]
                step = min(RANK_STEP, solution.a.shape[0] - ranks[best])
                ranks[best] += step
                spent += costs.lowrank_bits(step, module.in_features, module.out_features)
        for rel, r in ranks.items():
            if r:
                module, solution = solutions[rel]
                module.set_lowrank(*solution.factors(r))
                entries[rel].rank = r
                entries[rel].bits += costs.lowrank_bits(r, module.in_features, module.out_features)
        return spent


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
    carried = 0.0
    for index in tqdm(range(len(q_layers)), desc="repair", unit="layer", disable=not (progress and ranks.writes)):
        layer, name = q_layers[index], f"{prefix}.{index}"
        linears = {rel: m for rel, m in layer.named_modules() if isinstance(m, (QuantLinear, nn.Linear))}
        repairer = _LayerRepairer(plan, config, name, index, fp_layers[index], record, carried)
        q_hidden = _walk_layer(layer, linears, q_hidden, q_calls.calls[index], repairer, ranks, name)
        carried = repairer.budget
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
                    repairer.repair(layer, g.members, g.source, slots, acc, mean, weights, layer_weights)
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
