"""One full-precision forward pass, recorded part by part: the reference the quantized run is
compared against, one example at a time (memory: one example's activations of one model).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from bitcliff.diagnosis.hooks import Hooks
from bitcliff.diagnosis.model_parts import (
    COMPONENTS,
    component,
    decoder_layers,
    gate_projection,
)
from bitcliff.eval import next_token_nll
from bitcliff.layers import FIRST_TOKEN


@dataclass
class FPRecord:
    """The full-precision activations of one example of ``T`` tokens in a model of ``L`` layers.

    Attributes:
        ids: int64 ``[T]``.
        residual: ``L + 1`` fp32 ``[T, d]``: ``residual[0]`` enters layer 0, ``residual[l + 1]``
            leaves layer ``l``.
        outputs: per component name (``"attn"``, ``"mlp"``), ``L`` fp32 ``[T, d]`` block outputs.
        gate_active: ``L`` bool ``[T, d_ff]``: gate pre-activation > 0, or None (no gated MLP or
            not requested).
        attention: ``L`` fp32 ``[H, Tq, T]`` attention probabilities of the query rows
            ``query_rows``, or None (not requested).
        query_rows: int64 ``[Tq]`` or None.
        token_nll: fp64 ``[T - 1]`` next-token NLL.
    """

    ids: torch.Tensor
    residual: list[torch.Tensor]
    outputs: dict[str, list[torch.Tensor]]
    gate_active: list[torch.Tensor] | None
    attention: list[torch.Tensor] | None
    query_rows: torch.Tensor | None
    token_nll: torch.Tensor

    @property
    def n_layers(self) -> int:
        return len(self.residual) - 1

    def mean_nll(self) -> float:
        """The example's mean next-token NLL under the FP model."""
        return float(self.token_nll.mean())

    def magnitudes(self) -> list[float]:
        """``L + 1`` floats: the residual stream's mean L2 norm over the tokens from
        ``FIRST_TOKEN`` on, entering layer 0 and leaving each layer."""
        return [float(mean_token_norm(h[None])) for h in self.residual]


def mean_token_norm(hidden: torch.Tensor) -> torch.Tensor:
    """fp64 ``[B]``: the mean L2 norm of ``hidden`` ``[B, T, d]`` over the tokens from ``FIRST_TOKEN`` on."""
    return hidden[:, FIRST_TOKEN:].double().norm(dim=-1).mean(dim=-1)


def query_rows(n_tokens: int, n_rows: int) -> torch.Tensor:
    """int64 ``[<= n_rows]``: positions spread evenly over ``[FIRST_TOKEN, n_tokens)``, always
    including the last."""
    if n_tokens <= FIRST_TOKEN:
        raise ValueError(f"an example needs more than {FIRST_TOKEN} token(s), got {n_tokens}")
    n_rows = max(1, min(n_rows, n_tokens - FIRST_TOKEN))
    return torch.linspace(FIRST_TOKEN, n_tokens - 1, n_rows, device="cpu").round().long().unique()


@contextlib.contextmanager
def eager_attention(*models: nn.Module):
    """Switch models to the eager attention implementation (the only one that returns attention
    probabilities) and restore their own on exit."""
    saved = [m.config._attn_implementation for m in models]
    try:
        for m in models:
            m.set_attn_implementation("eager")
        yield
    finally:
        for m, impl in zip(models, saved):
            m.set_attn_implementation(impl)


@torch.inference_mode()
def model_logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """fp32 ``[T, V]`` logits of one example (int64 ``[T]``)."""
    device = next(model.parameters()).device
    # No KV cache: the analyses re-run layers with the keyword arguments of an earlier pass.
    return model(input_ids=ids[None].to(device), use_cache=False).logits[0].float()


@torch.inference_mode()
def record_fp(model: nn.Module, ids: torch.Tensor, attention_rows: int = 0, gates: bool = False) -> FPRecord:
    """Run the full-precision ``model`` on one example and record its parts.

    Args:
        model: the full-precision causal LM (eval mode).
        ids: int64 ``[T]``.
        attention_rows: record attention probabilities of this many query rows (0: none); the
            model must use eager attention (``eager_attention``).
        gates: record which gate pre-activations are positive.
    """
    layers = decoder_layers(model)
    residual: list[torch.Tensor] = []
    outputs: dict[str, list[torch.Tensor]] = {c: [] for c in COMPONENTS}
    gate_active: list[torch.Tensor] | None = [] if gates else None
    attention: list[torch.Tensor] | None = [] if attention_rows else None
    rows = query_rows(len(ids), attention_rows) if attention_rows else None
    with Hooks() as hooks:
        hooks.input(layers[0], lambda h: residual.append(h[0].float().clone()))
        for layer in layers:
            hooks.output(layer, lambda h: residual.append(h[0].float().clone()))
            for name in COMPONENTS:
                hooks.output(component(layer, name), lambda h, name=name: outputs[name].append(h[0].float().clone()))
            if gates:
                gate = gate_projection(layer)
                if gate is not None:
                    hooks.output(gate, lambda g: gate_active.append(g[0] > 0))
            if attention_rows:
                hooks.raw_output(component(layer, "attn"), lambda out: attention.append(_attention_rows(out, rows)))
        logits = model_logits(model, ids)
    if gates and len(gate_active) != len(layers):
        gate_active = None  # not a gated MLP in every layer
    return FPRecord(ids.cpu(), residual, outputs, gate_active, attention, rows, next_token_nll(logits.cpu(), ids.cpu()).double())


def _attention_rows(output, rows: torch.Tensor) -> torch.Tensor:
    """fp32 ``[H, len(rows), T]`` from an attention block's ``(out, weights)`` output."""
    weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
    if weights is None:
        raise RuntimeError("the attention block returned no probabilities; run under eager_attention()")
    return weights[0][:, rows.to(weights.device)].float().cpu()
