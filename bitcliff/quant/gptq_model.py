"""Whole-model GPTQ, decoder layer by decoder layer.

1. Capture: every decoder layer is swapped for a stand-in that records what the model passes to
   it (the hidden states at layer 0; per layer the attention mask, position embeddings, position
   ids ... which may differ between layers, e.g. Gemma 3's sliding and global layers) and passes
   the hidden states through; the last one raises, so nothing past the layers (the output head)
   runs.  Equal tensors are stored once.
2. For each layer: :func:`bitcliff.quant.gptq_layer.quantize_layer` accumulates the Hessians of
   its linears from hooks, solves them, and computes the layer's outputs with the quantized
   weights; those outputs are the next layer's inputs.  The layer's linears become
   :class:`QuantLinear` s.
3. Linears outside the decoder layers that are not skipped (the head, when ``skip_modules`` does
   not exclude it) have no calibration input here and are quantized by RTN, with a warning.

Everything about calibration data and batching is shared with the streaming path
(:mod:`bitcliff.quant.gptq_stream`), which runs the same steps on one layer in memory at a time.
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from bitcliff.quant.config import QuantConfig
from bitcliff.quant.convert import attach_config, is_skipped, quantizable_linears, set_submodule
from bitcliff.quant.gptq_layer import StopForward, discover_groups, quantize_layer
from bitcliff.quant.qlinear import QuantLinear
from bitcliff.quant.rtn import quantize_rtn

log = logging.getLogger(__name__)

# Where transformers models keep their decoder blocks (an nn.ModuleList), most common first.
LAYER_PATHS = (
    "model.layers",
    "model.language_model.layers",
    "model.decoder.layers",
    "transformer.h",
    "gpt_neox.layers",
    "transformer.blocks",
    "layers",
)
DEFAULT_BATCH_SIZE = 8  # calibration windows per layer forward
LOG_FILE = "gptq_log.json"


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """``(path, layers)`` of the model's decoder blocks, e.g. ``("model.layers", ModuleList)``.

    Raises:
        ValueError: naming the model class and the paths tried, when none holds a ModuleList.
    """
    for path in LAYER_PATHS:
        try:
            found = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(found, nn.ModuleList) and len(found) > 0:
            return path, found
    raise ValueError(
        f"cannot find the decoder layers of {type(model).__name__}: none of {', '.join(LAYER_PATHS)} "
        "is a non-empty nn.ModuleList of blocks"
    )


def check_calib_ids(calib_ids: torch.Tensor | None, config: QuantConfig) -> torch.Tensor:
    """Validate calibration windows and keep the first ``config.calib_samples``.

    Raises:
        ValueError: missing or empty windows, wrong shape/dtype, or fewer windows than
            ``config.calib_samples``.
    """
    if calib_ids is None:
        raise ValueError("GPTQ needs calibration data: pass calib_ids (int64 [n_windows, seq_len] token ids)")
    if not isinstance(calib_ids, torch.Tensor) or calib_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError("calib_ids must be an integer tensor [n_windows, seq_len] of token ids")
    if calib_ids.dim() != 2 or calib_ids.numel() == 0:
        raise ValueError(f"calib_ids must be a non-empty [n_windows, seq_len] tensor, got shape {tuple(calib_ids.shape)}")
    if calib_ids.shape[0] < config.calib_samples:
        raise ValueError(
            f"calib_ids holds {calib_ids.shape[0]} windows but config.calib_samples={config.calib_samples}; "
            "pass more windows or lower calib_samples"
        )
    return calib_ids[: config.calib_samples].long()


@dataclass
class CalibrationInputs:
    """What the decoder layers receive for the calibration batches.

    Attributes:
        hidden: per batch, the input of the first layer ``[B, T, H]``.
        calls: ``calls[layer][batch] = (args, kwargs)`` passed to that layer besides the input.
    """

    hidden: list[torch.Tensor]
    calls: list[list[tuple[tuple, dict]]]


class _Interner:
    """Returns one stored copy for equal tensors (masks, position embeddings repeat per batch)."""

    def __init__(self) -> None:
        self._kept: list[torch.Tensor] = []

    def __call__(self, value):
        if isinstance(value, torch.Tensor):
            value = value.detach()
            for kept in self._kept:
                if kept is value or (
                    kept.shape == value.shape and kept.dtype == value.dtype
                    and kept.device == value.device and torch.equal(kept, value)
                ):
                    return kept
            self._kept.append(value)
            return value
        if isinstance(value, tuple):
            items = [self(v) for v in value]
            return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
        if isinstance(value, list):
            return [self(v) for v in value]
        if isinstance(value, dict):
            return {k: self(v) for k, v in value.items()}
        return value


class _Catcher(nn.Module):
    def __init__(self, index: int, sink) -> None:
        super().__init__()
        self.index = index
        self.sink = sink

    def forward(self, hidden_states, *args, **kwargs):
        self.sink(self.index, hidden_states, args, kwargs)
        return hidden_states


def capture_calibration_inputs(
    model: nn.Module, layers: nn.ModuleList, calib_ids: torch.Tensor, batch_size: int
) -> CalibrationInputs:
    """Run ``model`` on ``calib_ids`` with its layers swapped for recording stand-ins.

    Only the modules before the first layer (embeddings) and the model-level preparation (masks,
    rotary embeddings) compute anything; the layers' own weights are never touched, so they may
    still be on the meta device.
    """
    n_layers = len(layers)
    hidden: list[torch.Tensor] = []
    calls: list[list] = [[] for _ in range(n_layers)]
    intern = _Interner()
    current: list[torch.Tensor] = []

    def sink(index, h, args, kwargs):
        if index == 0:
            current[:] = [h]
            hidden.append(h.detach())
        elif h is not current[0]:
            raise RuntimeError(
                "the model does not pass each decoder layer's output straight to the next layer; "
                "this architecture is not supported by layer-wise GPTQ"
            )
        calls[index].append((intern(args), intern(kwargs)))
        if index == n_layers - 1:
            raise StopForward

    originals = list(layers)
    device = _input_device(model)
    was_training = model.training
    model.eval()
    try:
        for i in range(n_layers):
            layers[i] = _Catcher(i, sink)
        with torch.no_grad():
            for batch in calib_ids.split(batch_size):
                try:
                    model(input_ids=batch.to(device), use_cache=False)
                except StopForward:
                    continue
                raise RuntimeError("the model's forward never reached its last decoder layer")
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
        model.train(was_training)
    return CalibrationInputs(hidden, calls)


def _input_device(model: nn.Module) -> torch.device:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(emb, "weight", None)
    if weight is not None and weight.device.type != "meta":
        return weight.device
    return torch.device("cpu")


def layer_targets(layer: nn.Module, layer_name: str, config: QuantConfig) -> tuple[dict[str, nn.Linear], dict[str, str]]:
    """``(targets, full_names)``: the layer's ``nn.Linear`` s to quantize, by relative name."""
    targets = {
        name: m
        for name, m in layer.named_modules()
        if type(m) is nn.Linear and not is_skipped(f"{layer_name}.{name}", config)
    }
    return targets, {name: f"{layer_name}.{name}" for name in targets}


def replace_with_quant_linears(layer: nn.Module, results: dict, config: QuantConfig, full_names: dict[str, str]) -> None:
    """Swap each quantized ``nn.Linear`` of ``layer`` for its :class:`QuantLinear`."""
    for name, result in results.items():
        linear = layer.get_submodule(name)
        qlinear = QuantLinear.from_quantized(result.qweight, config.group_size, linear.bias, full_names[name])
        set_submodule(layer, name, qlinear.to(linear.weight.device))


def quantize_outside_layers_rtn(model: nn.Module, prefix: str, config: QuantConfig) -> list[dict]:
    """RTN for selected linears outside the decoder layers (no calibration inputs reach them)."""
    entries = []
    for name, linear in quantizable_linears(model, config):
        if name.startswith(prefix + "."):
            continue
        warnings.warn(
            f"{name} lies outside the decoder layers, where GPTQ gets no calibration inputs; "
            "quantizing it with RTN (add it to skip_modules to keep it in full precision)",
            RuntimeWarning,
            stacklevel=2,
        )
        qlinear = QuantLinear.from_quantized(quantize_rtn(linear.weight, config, name), config.group_size, linear.bias, name)
        set_submodule(model, name, qlinear.to(linear.weight.device))
        entries.append({"layer": None, "module": name, "group": [name], "loss": None, "damp_percent": None,
                        "fallback": "outside the decoder layers", "refit_rows": None, "seconds": 0.0, "tokens": 0})
    return entries


def quantize_gptq(
    model: nn.Module,
    config: QuantConfig,
    progress: bool = True,
    calib_ids: torch.Tensor | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> nn.Module:
    """Quantize ``model`` in place by GPTQ, one decoder layer at a time.

    Args:
        model: a transformers causal LM (Llama, Gemma 3, ... with ``model.layers``) in memory.
        config: a ``QuantConfig`` with ``method="gptq"``.
        progress: show a tqdm bar over the layers.
        calib_ids: int64 ``[n_windows, seq_len]`` calibration windows
            (:func:`bitcliff.data.calibration_windows`); the first ``config.calib_samples`` are used.
        batch_size: windows per layer forward (memory vs speed; results depend on it slightly
            through float32 summation order).
    Returns:
        The same model with its linears replaced by :class:`QuantLinear`,
        ``model.bitcliff_config`` set and ``model.bitcliff_log`` holding one dict per module
        (see :func:`write_gptq_log`).
    Raises:
        ValueError: bad config or calibration data, or an unsupported model structure.
    """
    if config.method != "gptq":
        raise ValueError(f"quantize_gptq needs config.method='gptq', got {config.method!r}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    calib_ids = check_calib_ids(calib_ids, config)
    prefix, layers = find_decoder_layers(model)
    inputs = capture_calibration_inputs(model, layers, calib_ids, batch_size)
    entries: list[dict] = []
    hidden = inputs.hidden
    groups = None
    bar = tqdm(range(len(layers)), desc=f"GPTQ {config.describe()}", disable=not progress, unit="layer")
    for i in bar:
        start = time.perf_counter()
        layer = layers[i]
        targets, names = layer_targets(layer, f"{prefix}.{i}", config)
        if targets and (groups is None or {n for g in groups for n in g} != set(targets)):
            groups = discover_groups(layer, targets, hidden[0], inputs.calls[i][0])
        result = quantize_layer(layer, targets, hidden, inputs.calls[i], config, names, i, groups)
        replace_with_quant_linears(layer, result.results, config, names)
        hidden = result.outputs
        entries.extend(result.log)
        _report_layer(bar, i, result.log, time.perf_counter() - start)
    entries.extend(quantize_outside_layers_rtn(model, prefix, config))
    attach_config(model, config)
    model.bitcliff_log = entries
    return model


def _report_layer(bar, index: int, entries: list[dict], seconds: float) -> None:
    losses = [e["loss"] for e in entries if e["loss"] is not None]
    total = sum(losses) if losses else float("nan")
    log.info("layer %d: %d modules, GPTQ loss %.4g, %.1f s", index, len(entries), total, seconds)
    bar.set_postfix(loss=f"{total:.3g}")


def write_gptq_log(entries: list[dict], directory: str | os.PathLike) -> Path:
    """Write the per-module GPTQ log as ``<directory>/gptq_log.json`` (atomically).

    Each entry: layer, module, group (modules sharing its Hessian), loss (GPTQ objective, None
    after an RTN fallback), damp_percent (dampening actually used), fallback (None or the
    reason), refit_rows (fraction of rows whose scales ``refit_scales`` replaced, or None),
    seconds (its group's solve), tokens (calibration tokens seen).
    """
    path = Path(directory) / LOG_FILE
    tmp = path.with_name(f".{LOG_FILE}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(entries, indent=2))
    os.replace(tmp, path)
    return path
