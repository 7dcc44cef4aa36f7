"""The walk over one decoder layer's share groups: the pass that GPTQ and the repairs share.

A decoder layer calls its linears in groups that read one input tensor (*share groups*: for
Llama ``[q, k, v] [o] [gate, up] [down]``, :func:`bitcliff.layers.share_groups`).  Both GPTQ and
the repair walk need, per group, statistics of that input over the calibration batches, summed
over the ranks of a distributed run, and then act on the group (solve it, repair it) before the
batches go on.  :class:`GroupWalk` does this once for both:

    walk = GroupWalk(layer, linears, inputs, calls, name="model.layers.3", ranks=ranks)
    for group in walk:             # the batches are parked at this group's input
        h = group.statistics.hessian()
        walk.replace(rel, module)  # optional: another module in a member's place
    outputs = walk.outputs         # per batch, the layer's output through what was left

Two schedules:

* ``sequential`` (true-sequential GPTQ, the repairs): every batch runs in its own thread
  (:class:`~bitcliff.layers.SuspendedForwards`) and parks at each group's input; the group's
  statistics then come from inputs computed through the groups already acted on, and the layer
  is computed exactly once.
* otherwise (GPTQ as published): one forward with the original weights collects every group's
  statistics (stopping at the last group's input, whose output is not needed), the groups are
  handed out one by one, and one more forward computes the outputs.

Statistics: the covariance accumulator (:class:`~bitcliff.statistics.HessianAccumulator`, every
position, the attention sink too: a quantization that ignores its huge activations corrupts every
token's attention) and, with ``with_mean``, the mean input without the first position.  Members of
a group are checked to read the very tensor the first one read.  ``input_scale(member)`` may ask
for a member's in-flight input to be rescaled (a repair folded a scale into the norm feeding it).

Over several ranks every rank walks its own share of the batches; each group's statistics are
summed by an owner rank (balanced by ``owner_cost``) and every rank gets the sums.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from bitcliff.data import check_fits_context, check_token_ids
from bitcliff.distributed import Ranks
from bitcliff.layers import (
    LayerCall,
    LayerCalls,
    ShareGroup,
    StopForward,
    SuspendedForwards,
    removing,
    run_layer,
    set_submodule,
    share_groups,
)
from bitcliff.statistics import HessianAccumulator, MeanAccumulator, summed_over_ranks


@dataclass
class GroupInputs:
    """One share group, its input statistics complete and summed over the ranks.

    Attributes:
        members: the group's linears, relative to the layer, in call order.
        source: the leaf module whose output their input is (a norm), or None.
        statistics: ``Σ x xᵀ`` over every position (``hessian()`` is ``2 E[x xᵀ]``).
        mean: fp32 ``[K]`` mean input without the first position (``with_mean``), else None.
        owner: the rank that summed the statistics (and assembles anything the ranks share).
        name: the full name of the group's first member (for messages).
    """

    members: list[str]
    source: str | None
    statistics: HessianAccumulator
    mean: torch.Tensor | None
    owner: int
    name: str


class _Slot(nn.Module):
    """Holds one linear while the layer is walked, so that :meth:`GroupWalk.replace` can swap it even
    while parked forwards are inside its call."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)


class GroupWalk:
    """Iterate over one decoder layer's share groups (module docstring).

    Args:
        layer: the decoder layer.
        linears: relative name -> linear, the modules the walk covers.
        inputs: per calibration batch, the layer input ``[B, T, d]`` (this rank's share).
        calls: per batch, the other arguments the model passes to the layer.
        name: the layer's full name (``model.layers.3``).
        ranks: the processes sharing the walk (None: one).
        groups: the share groups (names, or :class:`~bitcliff.layers.ShareGroup`) if known; else
            they are found by one probing forward.
        sequential: the true-sequential schedule.
        with_mean: also collect the mean input of each group.
        owner_cost: relative cost of a group (its members) for its owner rank; default ``K²``.
        input_scale: member -> per-channel scale for its in-flight input, or None.
    """

    def __init__(self, layer: nn.Module, linears: dict[str, nn.Module], inputs: list[torch.Tensor],
                 calls: list[LayerCall], *, name: str, ranks: Ranks | None = None, groups=None,
                 sequential: bool = True, with_mean: bool = False,
                 owner_cost: Callable[[list[str]], float] | None = None,
                 input_scale: Callable[[str], torch.Tensor | None] | None = None) -> None:
        self.layer, self.linears, self.inputs, self.calls, self.name = layer, linears, inputs, calls, name
        self.ranks = ranks or Ranks.single()
        self.sequential, self.with_mean, self.input_scale = sequential, with_mean, input_scale
        self.groups: list[ShareGroup] | None = None  # the groups walked, once the walk has started
        self._groups = groups
        self._owner_cost = owner_cost or (lambda members: float(linears[members[0]].in_features) ** 2)
        self._slots: dict[str, _Slot] = {}
        self.outputs: list[torch.Tensor] | None = None

    def replace(self, rel: str, module: nn.Module) -> None:
        """Put ``module`` in member ``rel``'s place (forwards resume through it)."""
        self._slots[rel].inner = module

    def module(self, rel: str) -> nn.Module:
        return self._slots[rel].inner

    def __iter__(self) -> Iterator[GroupInputs]:
        self._slots = {rel: _Slot(module) for rel, module in self.linears.items()}
        for rel, slot in self._slots.items():
            set_submodule(self.layer, rel, slot)
        try:
            groups = self.groups = self._share_groups()
            heads = [g.members[0] for g in groups]
            devices = {h: _device(self.linears[h]) for h in heads}
            accs = {h: HessianAccumulator(self.linears[h].in_features, devices[h]) for h in heads}
            means = {h: MeanAccumulator(self.linears[h].in_features, devices[h]) for h in heads} if self.with_mean else {}
            owners = dict(zip(heads, self.ranks.owners([self._owner_cost(g.members) for g in groups])))
            forwards = SuspendedForwards(self.layer, self.inputs, self.calls) if self.sequential else None
            handles = self._hooks(groups, accs, means, forwards)
            with removing(handles), torch.no_grad():
                if forwards is None:  # one full-precision forward collects every group's statistics
                    for hidden, call in zip(self.inputs, self.calls):
                        try:
                            run_layer(self.layer, hidden, call)
                        except StopForward:
                            continue
                try:
                    for g in groups:
                        if forwards is not None:
                            forwards.advance()  # every batch is now parked at this group's input
                        head = g.members[0]
                        label = f"{self.name}.{head}"
                        statistics = summed_over_ranks(accs[head], self.ranks, owners[head], label)
                        mean = means[head].summed_over_ranks(self.ranks, owners[head], label) if means else None
                        yield GroupInputs(g.members, g.source, statistics, mean, owners[head], label)
                        statistics.release()
                    if forwards is not None:
                        forwards.advance()  # ... and on to the layer output
                        self.outputs = forwards.outputs
                finally:
                    if forwards is not None:
                        forwards.close()
            if forwards is None:  # through what the groups left, no hooks
                self.outputs = [run_layer(self.layer, hidden, call) for hidden, call in zip(self.inputs, self.calls)]
        finally:
            for rel, slot in self._slots.items():
                set_submodule(self.layer, rel, slot.inner)

    def _share_groups(self) -> list[ShareGroup]:
        if self._groups is None:
            return share_groups(self.layer, self._slots, self.inputs[0], self.calls[0])
        return [g if isinstance(g, ShareGroup) else ShareGroup(list(g), None) for g in self._groups]

    def _hooks(self, groups: list[ShareGroup], accs, means, forwards) -> list:
        """Capture at each group's first member (then park, or stop after the last group when not
        sequential); check that members read the first one's input; rescale in-flight inputs."""
        seen: dict[tuple[str, int], torch.Tensor] = {}  # per thread: batches may interleave
        last = groups[-1].members[0]

        def scaled(rel, args):
            gamma = self.input_scale(rel) if self.input_scale is not None else None
            return None if gamma is None else (args[0] * gamma.to(args[0]), *args[1:])

        def head_hook(rel):
            def hook(module, args):
                accs[rel].add(args[0])
                if means:
                    means[rel].add(args[0])
                seen[rel, threading.get_ident()] = args[0]
                if forwards is not None:
                    forwards.suspend()
                elif rel == last:
                    raise StopForward
                return scaled(rel, args)

            return hook

        def member_hook(head, rel):
            def hook(module, args):
                ref = seen.get((head, threading.get_ident()))
                x = args[0]
                if ref is not None and (x.data_ptr() != ref.data_ptr() or x.shape != ref.shape):
                    raise RuntimeError(f"{self.name}.{rel} no longer reads the same input as {self.name}.{head}; "
                                       "they cannot share their input statistics")
                return scaled(rel, args)

            return hook

        handles = []
        for g in groups:
            handles.append(self._slots[g.members[0]].register_forward_pre_hook(head_hook(g.members[0])))
            handles += [self._slots[m].register_forward_pre_hook(member_hook(g.members[0], m)) for m in g.members[1:]]
        return handles


def _device(module: nn.Module) -> torch.device:
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor):
        return weight.device
    return next((b.device for b in module.buffers()), torch.device("cpu"))


def rank_share(calib_ids: torch.Tensor, batch_size: int, ranks: Ranks) -> torch.Tensor:
    """This rank's contiguous share of the calibration windows, in whole batches of ``batch_size``.

    Raises:
        ValueError: fewer batches than ranks (a rank would have nothing to compute).
    """
    n_batches = -(-calib_ids.shape[0] // batch_size)
    if n_batches < ranks.world:
        raise ValueError(
            f"{ranks.world} ranks need at least {ranks.world} calibration batches, but {calib_ids.shape[0]} windows "
            f"in batches of {batch_size} make {n_batches}: use fewer ranks or more calibration windows"
        )
    share = ranks.share(n_batches)
    return calib_ids[share.start * batch_size: share.stop * batch_size]


def capture_calibration_inputs(
    model: nn.Module, layers: nn.ModuleList, calib_ids: torch.Tensor, batch_size: int
) -> LayerCalls:
    """What the decoder layers receive for each batch of ``batch_size`` calibration windows:
    ``inputs[0][b]`` (the first layer's input) and ``calls[l][b]`` for every layer ``l``."""
    check_fits_context(model, calib_ids.shape[-1], "calibration windows")
    check_token_ids(model, calib_ids, "calibration windows")
    recorded = LayerCalls(layers)
    device = _input_device(model)
    was_training = model.training
    model.eval()
    try:
        with recorded.replacing(), torch.no_grad():
            for batch in calib_ids.split(batch_size):
                try:
                    model(input_ids=batch.to(device), use_cache=False)
                except StopForward:
                    continue
                raise RuntimeError("the model's forward never reached its last decoder layer")
    finally:
        model.train(was_training)
    return recorded


def _input_device(model: nn.Module) -> torch.device:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(emb, "weight", None)
    if weight is not None and weight.device.type != "meta":
        return weight.device
    return torch.device("cpu")
