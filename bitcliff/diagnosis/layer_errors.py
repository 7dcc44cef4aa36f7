"""Per-layer error signals from the kernels' capture mode, and their cross-check against the
signal trace.

The quantized model (real ``QuantLinear`` layers: on CUDA the fused Triton capture, on CPU the
reference that defines the same numbers) runs under a ``CaptureSession(mode="error")``: every
linear reports, per token, ``||y_Q - y_FP||^2`` and ``||y_FP||^2`` for its *own* input, so each
module's figure is its local weight error on the inputs the quantized model actually gives it.

* per module: ``rel_err`` = ``sqrt(sum err_sq / sum fp_sq)`` over all tokens, and the worst
  token's relative error ``rel_err_max``;
* per layer: the same ratio summed over the layer's modules, and its worst module;
* cross-check: the Spearman correlation over layers between the capture's per-layer error and
  the signal trace's ``local_update_error`` (both measure what each layer's quantized weights do
  to its own computation; they should rank the layers alike).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from bitcliff.diagnosis.capture import CaptureSession
from bitcliff.diagnosis.fp_record import model_logits
from bitcliff.diagnosis.metrics import spearman
from bitcliff.diagnosis.model_parts import fp_linear_weights
from bitcliff.layers import find_decoder_layers, layer_index


@dataclass
class LayerErrors:
    """``modules``: one row per captured module (``module``, ``layer``, ``rel_err``,
    ``rel_err_max``, ``tokens``); ``layers``: per layer ``rel_err`` and ``worst_module``;
    ``agreement_with_trace``: Spearman over layers (None until cross-checked)."""

    modules: list[dict]
    layers: list[dict]
    tokens: int
    agreement_with_trace: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def cross_check(self, local_update_error: list[float]) -> float:
        """Spearman over layers against the signal trace's local errors; stored and returned."""
        ours = [row["rel_err"] for row in self.layers]
        if len(ours) != len(local_update_error):
            raise ValueError(f"{len(ours)} capture layers vs {len(local_update_error)} traced layers")
        self.agreement_with_trace = spearman(ours, local_update_error)
        return self.agreement_with_trace


@torch.inference_mode()
def capture_layer_errors(
    fp_model: nn.Module, q_model: nn.Module, examples: list[torch.Tensor], progress: bool = False
) -> LayerErrors:
    """Run ``q_model`` (with its ``QuantLinear`` layers) on ``examples`` (int64 ``[T]`` each)
    under an error capture, and aggregate per module and per layer."""
    if not examples:
        raise ValueError("capturing layer errors needs at least one example")
    weights = fp_linear_weights(fp_model, q_model)
    sums: dict[str, list[float]] = {}
    with CaptureSession(q_model, mode="error", fp_weights=weights, keep="aggregate") as session:
        tokens = 0
        for ids in tqdm(examples, desc="capture", unit="example", disable=not progress):
            model_logits(q_model, ids)
            tokens += len(ids)
        rows = session.summary()
    prefix, layer_list = find_decoder_layers(q_model)
    modules = []
    for row in rows:
        layer = layer_index(str(row["module"]), prefix)
        modules.append({
            "module": row["module"],
            "layer": layer,
            "rel_err": row["rel_err_total"],
            "rel_err_max": row["rel_err_max"],
            "tokens": row["tokens"],
        })
        if layer is not None:
            err, ref = sums.get(layer, [0.0, 0.0])
            sums[layer] = [err + row["err_sq_mean"] * row["tokens"], ref + row["fp_sq_mean"] * row["tokens"]]
    layers = []
    for index in range(len(layer_list)):
        own = [m for m in modules if m["layer"] == index]
        err, ref = sums.get(index, [0.0, 0.0])
        layers.append({
            "layer": index,
            "rel_err": math.sqrt(err / ref) if ref > 0 else math.nan,
            "worst_module": max(own, key=lambda m: m["rel_err"])["module"] if own else None,
        })
    return LayerErrors(modules, layers, tokens)
