"""Precision restoration: a module re-quantized from its full-precision weight at more bits (GPTQ
on the repaired model's inputs), or kept in full precision.

The checkpoint records such per-module overrides in ``quantization_config["dynamic"]``
(:mod:`bitcliff.quant.dynamic`), the convention GPTQModel writes and vLLM and SGLang read.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from bitcliff.kernels.pack import SUPPORTED_BITS
from bitcliff.layers import COMPONENTS, component_of
from bitcliff.quant.config import QuantConfig
from bitcliff.quant.dynamic import FULL_PRECISION
from bitcliff.quant.gptq import gptq_quantize
from bitcliff.quant.qlinear import QuantLinear
from bitcliff.repairs.budget import width_change_bits
from bitcliff.repairs.registry import (
    GroupRepair,
    MeasuredOption,
    PlanContext,
    Planned,
    Repair,
    cite,
)


def restore_module(name: str, weight: torch.Tensor, bias: torch.Tensor | None, hessian: torch.Tensor,
                   config: QuantConfig, bits: int) -> nn.Module:
    """``weight`` (fp ``[N, K]``) as a ``QuantLinear`` of ``bits`` bits quantized by GPTQ with
    ``hessian`` (the layer's ``2 X Xᵀ / n`` on the repaired model's inputs) and ``config``'s other
    settings, or an ``nn.Linear`` for ``bits = 16``."""
    n, k = weight.shape
    if bits >= FULL_PRECISION:
        linear = nn.Linear(k, n, bias=bias is not None, dtype=torch.float32)
        with torch.no_grad():
            linear.weight.copy_(weight)
            if bias is not None:
                linear.bias.copy_(bias)
        return linear.to(weight.device)
    restored = dataclasses.replace(config, bits=bits, method="gptq")
    result = gptq_quantize(weight.detach().float(), hessian, restored, name=name)
    return QuantLinear.from_quantized(result.qweight, restored.group_size, bias, name).to(weight.device)


def restored_width(bits: int) -> int:
    """What a restored ``bits``-bit module becomes: the widest packed width, or full precision when
    it is already that wide."""
    widest = max(SUPPORTED_BITS)
    return FULL_PRECISION if bits >= widest else widest


def restore_cost(module: dict) -> float:
    """Bits of restoring one module (``{"in", "out", "bits", "group_size"}``) to :func:`restored_width`."""
    bits = restored_width(module["bits"])
    return width_change_bits(module["in"], module["out"], (module["bits"], module["group_size"]),
                              (bits, module["group_size"]))


def component_order(data: dict, n_layers: int) -> list[tuple[tuple[int, str], str]]:
    """Components most in need of restoration first, each with the evidence that put it there:
    those that stopped functioning early (local F(c) below the verdict's threshold in the early
    third), earliest layer first, then every other one by ascending F(c)."""
    function = data["components"]["function"]["local"]
    threshold = data["verdict"]["thresholds"]["early_function"]
    third = max(1, n_layers // 3)
    scored = []
    for c in COMPONENTS:
        for layer, f in enumerate(function[c]):
            f = f if f is not None and f == f else 1.0
            dead_early = layer < third and f < threshold
            key = (0 if dead_early else 1, layer if dead_early else f, layer)
            why = (f"layer {layer} {c}: local F(c) {f:.2f} < {threshold:g} in the early third (layers 0-{third - 1})"
                   if dead_early else f"layer {layer} {c}: local F(c) {f:.2f}")
            scored.append((key, (layer, c), why))
    scored.sort()
    return [(component, why) for _, component, why in scored]


class PrecisionRestoration(Repair):
    """Structure: whole components (a layer's attention or MLP) restored to more bits, the least
    functional first, as the diagnosis ranks them."""

    name, kind, order, plan_order = "restore", "structure", 0, 0
    weighable = True

    def measured_options(self, ctx: PlanContext, curve) -> list[MeasuredOption]:
        """The module re-quantized at each wider width (full precision only from the widest packed
        one), with its measured estimate of the error left."""
        if not curve.widths and curve.bits < FULL_PRECISION:
            raise ValueError(f"the measurements of {curve.name} hold no wider width: they cannot weigh restoration "
                             "(measure again with bitcliff.measure_repairs)")
        before = curve.sensitivity * curve.error
        widest = max(SUPPORTED_BITS)
        return [MeasuredOption(self.name, curve.name,
                               width_change_bits(curve.in_features, curve.out_features,
                                                 (curve.bits, curve.group_size), (bits, curve.group_size)),
                               curve.sensitivity * error, bits, before)
                for bits, error in curve.widths.items() if bits != FULL_PRECISION or curve.bits >= widest]

    def plan_measured(self, ctx: PlanContext, chosen: dict[str, MeasuredOption]) -> Planned:
        bits = sum(o.cost for o in chosen.values())
        widths = sorted({o.decision for o in chosen.values()})
        reason = (f"re-quantize {len(chosen)} modules at "
                  f"{'/'.join('fp16' if b == FULL_PRECISION else f'{b} bits' for b in widths)} "
                  f"({bits / ctx.weights:.4f} bits/weight), chosen by the measured loss each removes per bit; "
                  "most per bit: " + cite(chosen, lambda o: o.module))
        return Planned({"modules": {name: o.decision for name, o in chosen.items()},
                        "evidence": {name: o.gain_per_bit for name, o in chosen.items()}}, bits, reason)

    @staticmethod
    def _members(ctx: PlanContext) -> dict[tuple[int, str], list[str]]:
        members: dict[tuple[int, str], list[str]] = {}
        for name in ctx.modules:
            component = component_of(name, ctx.prefix)
            if component is not None:
                members.setdefault(component, []).append(name)
        return members

    def plan(self, ctx: PlanContext, available: float) -> Planned | None:
        n_layers = len(ctx.diagnosis["components"]["function"]["local"]["attn"])
        members = self._members(ctx)
        restore, spent, chosen = {}, 0.0, []
        for component, why in component_order(ctx.diagnosis, n_layers):
            names = members.get(component, [])
            cost = sum(restore_cost(ctx.modules[n]) for n in names)
            if not names or cost <= 0 or spent + cost > available:
                continue
            for n in names:
                restore[n] = restored_width(ctx.modules[n]["bits"])
            spent += cost
            chosen.append(why)
        if not chosen:
            return None
        target = sorted(set(restore.values()))
        reason = (f"restore {len(chosen)} components to "
                  f"{'/'.join('fp16' if b == FULL_PRECISION else f'{b}-bit' for b in target)} "
                  f"({spent / ctx.weights:.4f} bits/weight), least functional first: " + "; ".join(chosen[:8])
                  + (f"; and {len(chosen) - 8} more" if len(chosen) > 8 else ""))
        return Planned({"modules": restore}, spent, reason)

    def cheapest(self, ctx: PlanContext) -> float | None:  # components are restored whole
        costs = [sum(restore_cost(ctx.modules[n]) for n in names) for names in self._members(ctx).values()]
        return min(costs) if costs else None

    def replaces(self, step: dict) -> set[str]:
        return set(step["modules"])

    def apply(self, step: dict, state: dict, group: GroupRepair) -> None:
        for rel in group.members:
            full = f"{group.name}.{rel}"
            old = group.modules[rel]
            if full not in step["modules"] or not isinstance(old, QuantLinear):
                continue
            bits = step["modules"][full]
            bias = old.bias.float() if old.bias is not None else None
            own = group.config.for_module(full)  # a mixed-precision model's module keeps its group size
            group.modules[rel] = restore_module(full, group.targets[rel], bias, group.statistics.hessian(), own, bits)
            group.entries[rel].restored_bits = bits
            group.entries[rel].bits += width_change_bits(old.in_features, old.out_features,
                                                          (old.bits, old.group_size), (bits, own.group_size))


REPAIR = PrecisionRestoration()
