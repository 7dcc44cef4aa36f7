"""The two runs of the quantized model that the trace analyses observe, one example at a time:

* ``"prop"``: end to end, as deployed: every error propagates;
* ``"local"``: every decoder layer fed the full-precision residual stream from the example's
  :class:`~bitcliff.diagnosis.fp_record.FPRecord` (teacher forcing): what each layer's own
  quantized weights do.

Each analysis that watches these runs (the signal trace, the component assessment) is an
*observer*: it adds its hooks for a run through ``observe(hooks, layers, record, run)``, so that
one forward of the quantized model feeds all of them.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Protocol

import torch
from torch import nn

from bitcliff.diagnosis.fp_record import FPRecord, model_logits
from bitcliff.diagnosis.hooks import Hooks
from bitcliff.diagnosis.model_parts import decoder_layers
from bitcliff.layers import LayerCalls, StopForward

RUNS = ("prop", "local")


class Observer(Protocol):
    def observe(self, hooks: Hooks, layers: list[nn.Module], record: FPRecord, run: str) -> None:
        """Add the hooks that measure ``run`` of the quantized model on ``record``'s example."""


@torch.inference_mode()
def run_quantized(
    q_model: nn.Module,
    record: FPRecord,
    run: str,
    observers: list[Observer] = (),
    calls: LayerCalls | None = None,
) -> torch.Tensor:
    """Run ``q_model`` on ``record.ids`` as ``run`` ("prop" or "local") with every observer's hooks.

    Args:
        q_model: the quantized model (or its dequantized twin).
        record: the example's full-precision record (``"local"`` needs its residual stream).
        run: ``"prop"`` or ``"local"``.
        observers: analyses that add hooks to this run.
        calls: when given, records what every decoder layer receives (for replaying layers later,
            as activation patching does).
    Returns:
        fp32 ``[T, V]`` logits of the propagated run; None for the teacher-forced run, which
        stops after the last decoder layer (nothing reads its logits).  Every hook is removed,
        also on errors.
    """
    if run not in RUNS:
        raise ValueError(f"run must be one of {RUNS}, got {run!r}")
    layers = decoder_layers(q_model)
    with Hooks() as hooks:
        if run == "local":
            for i, layer in enumerate(layers):
                hooks.input(layer, lambda h, i=i: record.residual[i][None].to(h.device))
        for observer in observers:
            observer.observe(hooks, layers, record, run)
        if run == "local":
            hooks.raw_output(layers[-1], _stop)  # after the observers' hooks on the same layer
        try:
            with calls.observing() if calls is not None else nullcontext():
                return model_logits(q_model, record.ids)
        except StopForward:
            return None


def _stop(output) -> None:
    raise StopForward
