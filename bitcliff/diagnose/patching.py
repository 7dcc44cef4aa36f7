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

from bitcliff.diagnose.fp_record import model_logits, record_fp, token_nll
from bitcliff.diagnose.hooks import Hooks
from bitcliff.diagnose.model_parts import COMPONENTS, component, decoder_layers, logit_lens

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


@torch.inference_mode()
def patch_activations(
    fp_model: nn.Module,
    q_model: nn.Module,
    examples: list[torch.Tensor],
    targets: tuple[str, ...] = TARGETS,
    progress: bool = True,
) -> PatchingResult:
    """Recovery of every (layer, target) over ``examples`` (int64 ``[T]`` each).

    Cost: ``len(targets) * n_layers + 1`` quantized forwards per example.
    """
    unknown = set(targets) - set(TARGETS)
    if unknown:
        raise ValueError(f"unknown patching targets {sorted(unknown)}; choose from {TARGETS}")
    if not examples:
        raise ValueError("activation patching needs at least one example")
    layers = decoder_layers(q_model)
    gained = {t: [0.0] * len(layers) for t in targets}
    damage = 0.0
    runs = [(t, i) for t in targets for i in range(len(layers))]
    bar = tqdm(total=len(examples) * len(runs), desc="patching", unit="run", disable=not progress)
    try:
        for ids in examples:
            record = record_fp(fp_model, ids)
            nll_fp = float(record.token_nll.mean())
            inputs, calls = _layer_inputs(q_model, layers, ids)
            nll_q = float(token_nll(logit_lens(q_model, _resume(layers, calls, inputs[0], 0)[0]).cpu(), ids).mean())
            damage += nll_q - nll_fp
            for target, i in runs:
                if target == "residual":  # restart after layer i from the FP stream
                    hidden, start = record.residual[i + 1][None].to(inputs[0].device), i + 1
                    final = _resume(layers, calls, hidden, start)
                else:
                    with Hooks() as hooks:
                        fp_value = record.outputs[target][i]
                        hooks.output(component(layers[i], target), lambda h, v=fp_value: v[None].to(h.device))
                        final = _resume(layers, calls, inputs[i], i)
                nll_patched = float(token_nll(logit_lens(q_model, final[0]).cpu(), ids).mean())
                gained[target][i] += nll_q - nll_patched
                bar.update()
    finally:
        bar.close()
    mean_damage = damage / len(examples)
    defined = mean_damage >= MIN_DAMAGE_NATS
    recovery = {t: [g / damage if defined else None for g in gained[t]] for t in targets}
    singles = [r for t in COMPONENTS if t in recovery for r in recovery[t]]
    total = sum(singles) if defined and singles else None
    return PatchingResult(recovery, mean_damage, total, len(examples), int(len(examples[0])))


def _layer_inputs(model: nn.Module, layers: list[nn.Module], ids: torch.Tensor) -> tuple[list[torch.Tensor], list[dict]]:
    """The residual stream entering each decoder layer in an unpatched run of ``model``, and the
    keyword arguments each layer was called with (masks, position embeddings...)."""
    inputs: list[torch.Tensor] = []
    calls: list[dict] = []
    handles = []

    def grab(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        inputs.append(hidden.detach())
        calls.append({k: v for k, v in kwargs.items() if k != "hidden_states"})

    try:
        for layer in layers:
            handles.append(layer.register_forward_pre_hook(grab, with_kwargs=True))
        model_logits(model, ids)
    finally:
        for handle in handles:
            handle.remove()
    return inputs, calls


def _resume(layers: list[nn.Module], calls: list[dict], hidden: torch.Tensor, start: int) -> torch.Tensor:
    """Run decoder layers ``start..`` on ``hidden`` (``[1, T, d]``) with the recorded arguments."""
    for layer, kwargs in zip(layers[start:], calls[start:]):
        out = layer(hidden, **kwargs)
        hidden = out[0] if isinstance(out, tuple) else out
    return hidden
