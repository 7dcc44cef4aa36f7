"""GPTQ for one decoder layer: Hessians from hooks, solves, the layer's new outputs, and its
linears swapped for ``QuantLinear`` (:func:`quantize_decoder_layer`, the step that both the
in-memory and the streaming walk over the layers repeat).

A decoder layer is treated as a black box that calls its linears.  One discovery pass records
the order in which the linears run and which of them read the *same* input tensor (q/k/v,
gate/up): those share one Hessian and are solved together (:mod:`bitcliff.quant.gptq`).  The
resulting ordered *share groups* (for Llama: ``[q,k,v] [o] [gate,up] [down]``) drive the work:

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
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
from torch import nn

from bitcliff.distributed import Ranks
from bitcliff.kernels.pack import unpack_qweight, unpack_qzeros
from bitcliff.layers import (
    LayerCall,
    StopForward,
    SuspendedForwards,
    removing,
    run_layer,
    share_groups,
)
from bitcliff.quant.config import QuantConfig
from bitcliff.quant.gptq import (
    GPTQResult,
    HessianAccumulator,
    concat_rows,
    gptq_quantize,
    split_result,
    summed_over_ranks,
)
from bitcliff.quant.qlinear import QuantLinear
from bitcliff.quant.qweight import QuantizedWeight
from bitcliff.quant.rtn import check_finite
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


def _run(layer: nn.Module, hidden: torch.Tensor, call: LayerCall) -> torch.Tensor:
    return run_layer(layer, hidden, call)


def discover_groups(
    layer: nn.Module, targets: dict[str, nn.Linear], hidden: torch.Tensor, call: LayerCall
) -> list[list[str]]:
    """Ordered share groups of ``targets`` (linears that read the same input tensor), by name."""
    return [group.members for group in share_groups(layer, targets, hidden, call)]


class _Passes:
    """Hooks for one forward of every calibration batch: Hessian capture and an early stop."""

    def __init__(self, targets: dict[str, nn.Linear], accs: dict[str, HessianAccumulator]) -> None:
        self.targets = targets
        self.accs = accs

    @contextmanager
    def capturing(self, groups: list[list[str]], stop_at: str | None = None, on_capture=None):
        """Accumulate the Hessians of ``groups`` (at each group's first module) while inside.

        ``stop_at``: a module whose pre-hook raises :class:`StopForward` after its capture.
        ``on_capture(name)``: called after each capture (true-sequential suspension).
        Members of a group are checked to read the very tensor their first module read.
        """
        handles = []
        owner_input: dict[tuple[str, int], torch.Tensor] = {}  # per thread: batches may interleave

        def capture_hook(name):
            def hook(module, args):
                self.accs[name].add(args[0])
                owner_input[name, threading.get_ident()] = args[0]
                if on_capture is not None:
                    on_capture(name)
                if name == stop_at:
                    raise StopForward

            return hook

        def member_hook(owner, name):
            def hook(module, args):
                x, ref = args[0], owner_input.get((owner, threading.get_ident()))
                if ref is not None and (x.data_ptr() != ref.data_ptr() or x.shape != ref.shape):
                    raise RuntimeError(f"{name} no longer reads the same input as {owner}; cannot share their Hessian")

            return hook

        for group in groups:
            handles.append(self.targets[group[0]].register_forward_pre_hook(capture_hook(group[0])))
            for member in group[1:]:
                handles.append(self.targets[member].register_forward_pre_hook(member_hook(group[0], member)))
        with removing(handles):
            yield


def _forward_all(layer: nn.Module, inputs: list[torch.Tensor], calls: list) -> list[torch.Tensor]:
    """Run every batch; batches stopped by :class:`StopForward` give no output."""
    outputs = []
    with torch.no_grad():
        for hidden, call in zip(inputs, calls):
            try:
                outputs.append(_run(layer, hidden, call))
            except StopForward:
                continue
    return outputs


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
    full_names: dict[str, str],
    ranks: Ranks | None = None,
) -> SolvedLayer:
    """Accumulate every group's Hessian, solve it, and compute the layer's outputs (see the
    module docstring for the default and the true-sequential schedule, and for ``ranks``:
    ``inputs`` and ``calls`` are then this rank's share of the batches).  The target linears end
    up holding their dequantized weights."""
    ranks = ranks or Ranks.single()
    accs = {g[0]: HessianAccumulator(targets[g[0]].in_features, targets[g[0]].weight.device) for g in groups}
    owner = dict(zip((g[0] for g in groups), ranks.owners([solve_cost(g, targets) for g in groups])))
    passes = _Passes(targets, accs)
    results: dict[str, GPTQResult] = {}
    seconds: dict[str, float] = {}
    tokens: dict[str, int] = {}

    def shared_hessian(group) -> tuple[torch.Tensor, int]:
        """The group's Hessian over every rank's batches and its token count, on every rank."""
        acc = summed_over_ranks(accs[group[0]], ranks, owner[group[0]], full_names[group[0]])
        hessian = acc.hessian()
        acc.release()
        return hessian, acc.count

    def solve(batch: list[list[str]]) -> None:
        """Solve ``batch``'s groups, every rank its block of each group's rows, and give every rank
        the whole results (assembled by each group's owner)."""
        hessians = {g[0]: shared_hessian(g) for g in batch}
        blocks = {}
        for group in batch:
            weight, (hessian, _) = _stacked(group, targets), hessians[group[0]]
            rows = ranks.share(weight.shape[0])
            label = ", ".join(full_names[name] for name in group)
            start = time.perf_counter()
            if ranks.distributed:  # the whole weight, so that every rank agrees on the error
                check_finite(weight, label)
            blocks[group[0]] = (gptq_quantize(weight[rows.start: rows.stop], hessian, config, name=label),
                                time.perf_counter() - start)
        for group in batch:
            block, secs = blocks[group[0]]
            if ranks.distributed:
                block, secs = _assemble(group, block, secs, hessians[group[0]][0])
            parts = split_result(block, [targets[n].out_features for n in group]) if len(group) > 1 else [block]
            group_results = dict(zip(group, parts))
            _swap_in(targets, group_results)
            results.update(group_results)
            seconds.update({member: secs for member in group})
            tokens.update({member: hessians[group[0]][1] for member in group})
            del hessians[group[0]]

    def _assemble(group, block: GPTQResult, secs: float, hessian: torch.Tensor) -> tuple[GPTQResult, float]:
        """The whole group's result on every rank, from the ranks' row blocks (through the owner)."""
        dst, name = owner[group[0]], full_names[group[0]]
        gathered = ranks.gather(*_result_message({group[0]: block}, secs), dst, f"collecting the rows of {name}")
        message = (None, None)
        if gathered is not None:
            pieces = [_result_from_message(h, t)[group[0]] for h, t in gathered]
            try:
                whole = concat_rows(pieces)
            except ValueError:  # some blocks fell back to RTN: solve it whole, as one process would
                whole = gptq_quantize(_stacked(group, targets), hessian, config, name=name)
            message = _result_message({group[0]: whole}, max(h["seconds"] for h, _ in gathered))
        header, tensors = ranks.broadcast(*message, src=dst, what=f"sending the quantized {name}")
        return _result_from_message(header, tensors)[group[0]], header["seconds"]

    if config.true_sequential:
        forwards = SuspendedForwards(layer, inputs, calls)
        try:
            with passes.capturing(groups, on_capture=lambda _: forwards.suspend()):
                for group in groups:
                    forwards.advance()  # every batch runs up to this group's input and waits there
                    solve([group])
                forwards.advance()  # ... and on to the layer output, through the quantized group
        finally:
            forwards.close()
        outputs = forwards.outputs
    else:
        with passes.capturing(groups, stop_at=groups[-1][0]):
            _forward_all(layer, inputs, calls)  # full precision; the last group's output is not needed
        solve(groups)
        outputs = _forward_all(layer, inputs, calls)
    return SolvedLayer(outputs, results, seconds, tokens)


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
    solved = solve_layer(layer, targets, groups, inputs, calls, config, full_names, ranks)
    entries = []
    for group in groups:
        for rel in group:
            r, linear = solved.results[rel], targets[rel]
            qlinear = QuantLinear.from_quantized(r.qweight, config.group_size, linear.bias, full_names[rel])
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
