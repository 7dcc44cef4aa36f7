"""Activation patching: restore one full-precision activation inside the quantized run and
measure how much of the quantization damage goes away.

For each layer ``l`` and target ``t``:

* ``attn`` / ``mlp``: the block's output in the quantized run is replaced by the FP output of the
  same block on the same example (the rest of the model stays quantized and sees it);
* ``residual``: the whole residual stream leaving layer ``l`` is replaced by the FP one, so
  everything before ``l`` is repaired at once.

Recovery ``R = sum_e (NLL_Q - NLL_patched) / sum_e (NLL_Q - NLL_FP)`` over the examples ``e``
(each NLL the example's mean next-token NLL): 1 = the patch removes all damage, 0 = none,
< 0 = it makes things worse.  ``residual`` recovery falls from about 1 at layer 0 to the
share of damage the last layer alone causes: ``1 - R_residual[l]`` is the share of the damage
done after layer ``l``.

``total_single`` sums the ``attn`` and ``mlp`` recoveries of every layer: about 1 when the damage
is the sum of many small independent errors (what compensation can repair one component at a
time), well below 1 when errors interact, so that no single repaired component helps on its own.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from bitcliff.diagnosis.fp_record import FPRecord, record_fp
from bitcliff.diagnosis.hooks import Hooks
from bitcliff.diagnosis.model_parts import (
    COMPONENTS,
    component,
    decoder_layers,
    logit_lens,
)
from bitcliff.diagnosis.quantized_runs import run_quantized
from bitcliff.eval import next_token_nll
from bitcliff.layers import LayerCalls, find_decoder_layers, layer_architecture, run_layers

TARGETS = (*COMPONENTS, "residual")

#: Below this mean damage (nats per token) recovery is a ratio of two noise-level numbers and
#: is reported as None.
MIN_DAMAGE_NATS = 0.005


@dataclass
class PatchingResult:
    """``recovery[t][l]`` for ``t`` in ``("attn", "mlp", "residual")`` (None when the damage is
    below ``MIN_DAMAGE_NATS``), the damage ``mean NLL_Q - mean NLL_FP`` it is relative to, and
    ``total_single`` (see the module docstring)."""

    recovery: dict[str, list[float | None]]
    damage_nats: float
    total_single: float | None
    examples: int
    tokens_per_example: int

    def to_dict(self) -> dict:
        return asdict(self)


class PatchingAccumulator:
    """Sums the damage and the per-(target, layer) gains over examples.

    Per example it needs the FP record and what the quantized model's decoder layers received in
    its propagated run (a :class:`~bitcliff.layers.LayerCalls` recorded by
    ``run_quantized(..., calls=...)``); each patched run replays the layers from the patched one
    on, with the three targets of a layer batched into one forward.
    """

    def __init__(self, n_layers: int, targets: tuple[str, ...] = TARGETS) -> None:
        unknown = set(targets) - set(TARGETS)
        if unknown:
            raise ValueError(f"unknown patching targets {sorted(unknown)}; choose from {TARGETS}")
        self.targets = targets
        self.gained = {t: [0.0] * n_layers for t in targets}
        self.damage = 0.0
        self.examples = 0
        self.tokens_per_example = 0

    @torch.inference_mode()
    def add(self, q_model: nn.Module, record: FPRecord, calls: LayerCalls, q_logits: torch.Tensor) -> None:
        """One example: its FP record, what the quantized layers received in the propagated
        run, and that run's fp32 ``[T, V]`` logits (the unpatched baseline)."""
        layers = decoder_layers(q_model)
        call = calls.for_forward(0)
        nll_q = float(next_token_nll(q_logits.cpu(), record.ids).double().mean())
        self.damage += nll_q - record.mean_nll()
        # one row per target in one forward, where the recorded arguments broadcast over rows
        batches = [self.targets] if layer_architecture(layers[0]).batched_replay else [(t,) for t in self.targets]
        for i in range(len(layers)):
            for targets in batches:
                batch = calls.inputs[i][0].expand(len(targets), -1, -1)
                with Hooks() as hooks:
                    for row, target in enumerate(targets):
                        if target == "residual":  # the stream leaving layer i, i.e. a restart after it
                            module, value = layers[i], record.residual[i + 1]
                        else:
                            module, value = component(layers[i], target), record.outputs[target][i]
                        hooks.output(module, lambda h, row=row, v=value: _with_row(h, row, v))
                    final = run_layers(layers, call, batch, i)
                for target, nll in zip(targets, _mean_nll(q_model, final, record.ids)):
                    self.gained[target][i] += nll_q - nll
        self.examples += 1
        self.tokens_per_example = len(record.ids)

    def result(self) -> PatchingResult:
        if not self.examples:
            raise ValueError("activation patching needs at least one example")
        mean_damage = self.damage / self.examples
        defined = mean_damage >= MIN_DAMAGE_NATS
        recovery = {t: [g / self.damage if defined else None for g in self.gained[t]] for t in self.targets}
        singles = [r for t in COMPONENTS if t in recovery for r in recovery[t]]
        total = sum(singles) if defined and singles else None
        return PatchingResult(recovery, mean_damage, total, self.examples, self.tokens_per_example)


def _with_row(hidden: torch.Tensor, row: int, value: torch.Tensor) -> torch.Tensor:
    """``hidden`` ``[B, T, d]`` with row ``row`` replaced by ``value`` ``[T, d]``."""
    patched = hidden.clone()
    patched[row] = value.to(hidden.device, hidden.dtype)
    return patched


def _mean_nll(model: nn.Module, final_hidden: torch.Tensor, ids: torch.Tensor) -> list[float]:
    """Per row of the last layer's output ``[B, T, d]``: the mean next-token NLL of ``ids``."""
    logits = logit_lens(model, final_hidden).cpu()
    return [float(next_token_nll(row, ids).double().mean()) for row in logits]


def patch_activations(
    fp_model: nn.Module,
    q_model: nn.Module,
    examples: list[torch.Tensor],
    targets: tuple[str, ...] = TARGETS,
    progress: bool = True,
) -> PatchingResult:
    """Recovery of every (layer, target) over ``examples`` (int64 ``[T]`` each).

    Cost per example: one FP and one quantized forward, then ``n_layers`` batched replays of
    the layers from the patched one on.  Replays run the same layer calls as the propagated
    run, so the unpatched baseline is that run's output (equal to a replay from layer 0).
    """
    accumulator = PatchingAccumulator(len(decoder_layers(q_model)), targets)
    if not examples:
        raise ValueError("activation patching needs at least one example")
    for ids in tqdm(examples, desc="patching", unit="example", disable=not progress):
        record = record_fp(fp_model, ids)
        calls = LayerCalls(find_decoder_layers(q_model)[1])
        logits = run_quantized(q_model, record, "prop", calls=calls)
        accumulator.add(q_model, record, calls, logits)
    return accumulator.result()
