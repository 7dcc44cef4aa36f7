"""GPTQ for one decoder layer: Hessians, solves, the layer's new outputs, and its linears swapped
for ``QuantLinear`` (:func:`quantize_decoder_layer`, the step that both the in-memory and the
streaming walk over the layers repeat).

A decoder layer is treated as a black box that calls its linears.  One discovery pass records
the order in which the linears run and which of them read the *same* input tensor (q/k/v,
gate/up): those share one Hessian and are solved together (:mod:`bitcliff.quant.gptq`).  The
resulting ordered *share groups* (for Llama: ``[q,k,v] [o] [gate,up] [down]``) drive the work,
through the walk the repairs use too (:class:`bitcliff.group_walk.GroupWalk`):

- default: one forward with the full-precision weights accumulates every group's Hessian (it
  stops at the last group's input, whose output is not needed), all groups are solved, and one
  forward with the quantized weights computes the outputs for the next layer.
- ``true_sequential``: each group's Hessian comes from inputs computed with the groups before it
  already quantized.  Every calibration batch runs its forward in its own thread and parks at
  the next group's input; when all batches wait there the group is solved, and they go on with
  the quantized weights.  The layer is thus computed once, with no forward restarted, which
  makes this mode cheaper than the default as well as closer to the quantized model.

Forwards stop early by raising a private exception from a forward pre-hook; every hook is
removed in a ``finally`` block, and parked threads are released on any error or interruption.

Over several ranks (:mod:`bitcliff.distributed`) every rank runs the layer on its own share of
the calibration batches.  Each group has an *owner* rank (balancing the work it does, rows x
K²): the other ranks send it their partial Hessians, it sums them in rank order and sends the
Hessian back; every rank solves its own block of the group's rows (rows are independent under
GPTQ); the owner collects the blocks and sends every rank the packed whole, which it swaps in
before going on.  Splitting rows rather than giving each group to one rank is what lets the
ranks share the solves in the true-sequential schedule too, where a group's input depends on
the groups before it and the groups of a layer can only be solved one after another.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from bitcliff.distributed import Ranks
from bitcliff.group_walk import GroupWalk
from bitcliff.kernels.pack import unpack_qweight, unpack_qzeros
from bitcliff.layers import LayerCall, run_layer, share_groups
from bitcliff.quant.config import QuantConfig
from bitcliff.quant.gptq import GPTQResult, concat_rows, gptq_quantize, split_result
from bitcliff.quant.qlinear import QuantLinear
from bitcliff.quant.qweight import QuantizedWeight
from bitcliff.quant.finite import check_finite
from bitcliff.quant.surgery import quantizable_linears, set_submodule

log = logging.getLogger(__name__)


@dataclass
class ModuleLog:
    """How one module was quantized (one entry of ``gptq_log.json``).

    Attributes:
        layer: decoder layer index, or None outside the decoder layers.
        module: full module name.
        group: the modules that shared its Hessian (read the same input).
        loss: GPTQ objective; None after an RTN fallback.
        damp_percent: dampening actually used; None after a fallback.
        fallback: None, or why RTN was used instead.
        refit_rows: fraction of rows whose scales the refit replaced, or None without refit.
        seconds: time of its group's solve.
        tokens: calibration tokens seen.
    """

    layer: int | None
    module: str
    group: list[str]
    loss: float | None
    damp_percent: float | None
    fallback: str | None
    refit_rows: float | None
    seconds: float
    tokens: int

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class LayerStep:
    """What :func:`quantize_decoder_layer` returns.

    Attributes:
        outputs: per batch, the layer's output ``[B, T, d]`` with quantized weights (the next
            layer's input).
        log: one :class:`ModuleLog` per quantized module, in solve order.
        groups: the share groups (relative names) in the order they were solved; pass them to
            the next layer's step, which reuses them when its linears have the same names.
    """

    outputs: list[torch.Tensor]
    log: list[ModuleLog]
    groups: list[list[str]] | None


def discover_groups(
    layer: nn.Module, targets: dict[str, nn.Linear], hidden: torch.Tensor, call: LayerCall
) -> list[list[str]]:
    """Ordered share groups of ``targets`` (linears that read the same input tensor), by name."""
    return [group.members for group in share_groups(layer, targets, hidden, call)]


def _forward_all(layer: nn.Module, inputs: list[torch.Tensor], calls: list) -> list[torch.Tensor]:
    """Every batch's layer output."""
    with torch.no_grad():
        return [run_layer(layer, hidden, call) for hidden, call in zip(inputs, calls)]


def _stacked(group: list[str], targets: dict[str, nn.Linear]) -> torch.Tensor:
    """The group's weights stacked by rows ``[sum N, K]``: solving them at once against their
    shared Hessian is exact, since GPTQ treats rows independently."""
    weights = [targets[name].weight for name in group]
    return torch.cat([w.detach().float() for w in weights], dim=0) if len(group) > 1 else weights[0]


def _swap_in(targets: dict[str, nn.Linear], results: dict[str, GPTQResult]) -> None:
    """Later passes must see the quantized weights; nn.Linear runs them faster than unpacking."""
    with torch.no_grad():
        for name, result in results.items():
            targets[name].weight.copy_(result.qweight.dequantize(targets[name].weight.dtype))


def solve_cost(group: list[str], targets: dict[str, nn.Linear]) -> float:
    """Relative cost of a share group for its owner (summing, sending): its rows times K²."""
    k = targets[group[0]].in_features
    return float(sum(targets[name].out_features for name in group) * k * k)


def _result_message(results: dict[str, GPTQResult], seconds: float):
    """Solved weights as a picklable header and tensors (codes and zeros packed)."""
    header, tensors = {"seconds": seconds, "modules": []}, []
    for name, r in results.items():
        qw = r.qweight
        header["modules"].append({"name": name, "bits": qw.bits, "in": qw.codes.shape[0], "out": qw.codes.shape[1],
                                  "loss": r.loss, "damp_percent": r.damp_percent, "fallback": r.fallback,
                                  "refit": r.refit_rows is not None})
        packed = qw.packed()
        tensors += [packed["qweight"], packed["qzeros"], qw.scales, qw.g_idx, r.row_loss]
        if r.refit_rows is not None:
            tensors.append(r.refit_rows.to(torch.uint8))  # not every backend sends bool
    return header, tensors


def _result_from_message(header: dict, tensors: list[torch.Tensor]) -> dict[str, GPTQResult]:
    results, it = {}, iter(tensors)
    for m in header["modules"]:
        qweight, qzeros, scales, g_idx, row_loss = (next(it) for _ in range(5))
        qw = QuantizedWeight(unpack_qweight(qweight, m["bits"], m["in"]), scales,
                             unpack_qzeros(qzeros, m["bits"], m["out"]), g_idx, m["bits"])
        refit = next(it).bool() if m["refit"] else None
        results[m["name"]] = GPTQResult(qw, m["loss"], row_loss, m["damp_percent"], m["fallback"], refit)
    return results


@dataclass
class SolvedLayer:
    """What :func:`solve_layer` returns: per batch the layer ``outputs`` with quantized weights,
    and per relative module name its :class:`GPTQResult`, solve ``seconds`` and calibration
    ``tokens``."""

    outputs: list[torch.Tensor]
    results: dict[str, GPTQResult]
    seconds: dict[str, float]
    tokens: dict[str, int]


def solve_layer(
    layer: nn.Module,
    targets: dict[str, nn.Linear],
    groups: list[list[str]],
    inputs: list[torch.Tensor],
    calls: list[LayerCall],
    config: QuantConfig,
    *,
    full_names: dict[str, str],
    ranks: Ranks | None = None,
) -> SolvedLayer:
    """Solve every share group on its Hessian and compute the layer's outputs: the groups come
    from the layer's :class:`~bitcliff.group_walk.GroupWalk` (true-sequential or not, see the
    module docstring; over ``ranks``, ``inputs`` and ``calls`` are this rank's share of the
    batches).  The target linears end up holding their dequantized weights."""
    ranks = ranks or Ranks.single()
    results: dict[str, GPTQResult] = {}
    seconds: dict[str, float] = {}
    tokens: dict[str, int] = {}
    rel, full = next(iter(full_names.items()))
    name = full[: -len(rel) - 1]  # the layer's full name
    walk = GroupWalk(layer, targets, inputs, calls, name=name, ranks=ranks, groups=groups,
                     sequential=config.true_sequential, owner_cost=lambda members: solve_cost(members, targets))
    for group in walk:
        hessian, count = group.statistics.hessian(), group.statistics.count
        group.statistics.release()
        # Members of one width are solved stacked; mixed precision may give members of a share
        # group different widths, each solved on the group's Hessian (rows are independent).
        for members, own in _by_width(group.members, config, full_names):
            # Every rank solves its block of the rows.
            weight = _stacked(members, targets)
            rows = ranks.share(weight.shape[0])
            label = ", ".join(full_names[m] for m in members)
            start = time.perf_counter()
            if ranks.distributed:  # the whole weight, so that every rank agrees on the error
                check_finite(weight, label)
            block = gptq_quantize(weight[rows.start: rows.stop], hessian, own, name=label)
            secs = time.perf_counter() - start
            if ranks.distributed:
                block, secs = _assemble(members, block, secs, hessian, targets=targets, config=own,
                                        owner=group.owner, ranks=ranks, name=full_names[members[0]])
            parts = split_result(block, [targets[n].out_features for n in members]) if len(members) > 1 else [block]
            group_results = dict(zip(members, parts))
            _swap_in(targets, group_results)
            results.update(group_results)
            seconds.update({member: secs for member in members})
            tokens.update({member: count for member in members})
    return SolvedLayer(walk.outputs, results, seconds, tokens)


def _by_width(members: list[str], config: QuantConfig, full_names: dict[str, str]) -> list[tuple[list[str], QuantConfig]]:
    """A share group's members split by the setting each is quantized with, in member order."""
    parts: dict[QuantConfig, list[str]] = {}
    for member in members:
        parts.setdefault(config.for_module(full_names[member]), []).append(member)
    return [(names, own) for own, names in parts.items()]


def _assemble(members, block: GPTQResult, secs: float, hessian: torch.Tensor, *, targets, config: QuantConfig,
              owner: int, ranks: Ranks, name: str) -> tuple[GPTQResult, float]:
    """The whole group's result on every rank, from the ranks' row blocks (through the owner)."""
    gathered = ranks.gather(*_result_message({members[0]: block}, secs), owner, f"collecting the rows of {name}")
    message = (None, None)
    if gathered is not None:
        pieces = [_result_from_message(h, t)[members[0]] for h, t in gathered]
        try:
            whole = concat_rows(pieces)
        except ValueError:  # some blocks fell back to RTN: solve it whole, as one process would
            whole = gptq_quantize(_stacked(members, targets), hessian, config, name=name)
        message = _result_message({members[0]: whole}, max(h["seconds"] for h, _ in gathered))
    header, tensors = ranks.broadcast(*message, src=owner, what=f"sending the quantized {name}")
    return _result_from_message(header, tensors)[members[0]], header["seconds"]


def quantize_decoder_layer(
    layer: nn.Module,
    name: str,
    inputs: list[torch.Tensor],
    calls: list[LayerCall],
    config: QuantConfig,
    groups: list[list[str]] | None = None,
    ranks: Ranks | None = None,
) -> LayerStep:
    """Quantize the linears of one decoder layer by GPTQ and swap them for ``QuantLinear``.

    Args:
        layer: the decoder layer (in place: its selected linears become ``QuantLinear``).
        name: its full module name, e.g. ``"model.layers.7"`` (for skip rules, logs, warnings).
        inputs: per calibration batch, the layer input ``[B, T, d]``.
        calls: per batch, the other arguments the model passes to this layer.
        config: GPTQ settings.
        groups: share groups of a previous layer, reused when this layer's linears have the
            same relative names (else discovered here).
        ranks: the ranks sharing the work (``inputs`` and ``calls`` are this rank's share of
            the batches); None for one process.
    Returns:
        A :class:`LayerStep`; ``outputs`` are computed with the quantized weights.
    """
    tail = name.rsplit(".", 1)[-1]
    index = int(tail) if tail.isdigit() else None
    targets = dict(quantizable_linears(layer, config, prefix=name + "."))
    if not targets:
        return LayerStep(_forward_all(layer, inputs, calls), [], groups)
    if groups is None or {n for g in groups for n in g} != set(targets):
        groups = discover_groups(layer, targets, inputs[0], calls[0])
    full_names = {rel: f"{name}.{rel}" for rel in targets}
    solved = solve_layer(layer, targets, groups, inputs, calls, config, full_names=full_names, ranks=ranks)
    entries = []
    for group in groups:
        for rel in group:
            r, linear = solved.results[rel], targets[rel]
            group_size = config.for_module(full_names[rel]).group_size
            qlinear = QuantLinear.from_quantized(r.qweight, group_size, linear.bias, full_names[rel])
            set_submodule(layer, rel, qlinear.to(linear.weight.device))
            entries.append(ModuleLog(
                layer=index,
                module=full_names[rel],
                group=[full_names[n] for n in group],
                loss=r.loss,
                damp_percent=r.damp_percent,
                fallback=r.fallback,
                refit_rows=None if r.refit_rows is None else round(float(r.refit_rows.float().mean()), 4),
                seconds=round(solved.seconds[rel], 4),
                tokens=solved.tokens[rel],
            ))
    return LayerStep(solved.outputs, entries, groups)
