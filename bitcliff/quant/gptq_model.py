"""Whole-model GPTQ, decoder layer by decoder layer.

1. Capture: the model runs on the calibration windows with its decoder layers swapped for
   pass-through stand-ins (:meth:`bitcliff.layers.LayerCalls.replacing`), which record the
   first layer's input and what the model passes to every layer (attention mask, position
   embeddings... which may differ between layers, e.g. Gemma 3's sliding and global layers).
   Nothing past the embeddings computes, so the layers' weights may still be on the meta device.
2. For each layer, :func:`bitcliff.quant.gptq_layer.quantize_decoder_layer` accumulates the
   Hessians of its linears, solves them, computes the layer's outputs with the quantized
   weights (the next layer's inputs) and swaps the linears for ``QuantLinear``.
3. Selected linears outside the decoder layers (the head, when ``skip_modules`` does not exclude
   it) get no calibration input there and are quantized by RTN, with a warning
   (:func:`quantize_outside_layers_rtn`).

The streaming path (:mod:`bitcliff.quant.gptq_stream`) runs the same steps with one layer in
memory at a time.  Both run on several ranks (:mod:`bitcliff.distributed`): the calibration
batches are split into contiguous shares, each rank captures and carries its own share through
the layers, and the solves are shared as :mod:`bitcliff.quant.gptq_layer` describes; every rank
ends with the same quantized model.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from bitcliff.distributed import Ranks
from bitcliff.group_walk import capture_calibration_inputs, rank_share
from bitcliff.kernels.cpu import exact_activations
from bitcliff.layers import find_decoder_layers
from bitcliff.quant.config import QuantConfig
from bitcliff.quant.gptq_layer import LayerStep, ModuleLog, quantize_decoder_layer
from bitcliff.quant.surgery import attach_config, quantizable_linears, quantize_linears_rtn
from bitcliff.storage import write_json

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 8  # calibration windows per layer forward
LOG_FILE = "gptq_log.json"
LOG_ATTRIBUTE = "bitcliff_log"  # the per-module log on a model quantized in memory


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


def quantize_outside_layers_rtn(model: nn.Module, prefix: str, config: QuantConfig) -> list[ModuleLog]:
    """RTN for the selected linears outside the decoder layers (no calibration input reaches
    them), with a warning each; returns their log entries."""
    outside = [name for name, _ in quantizable_linears(model, config) if not name.startswith(prefix + ".")]
    for name in outside:
        warnings.warn(
            f"{name} lies outside the decoder layers, where GPTQ gets no calibration inputs; "
            "quantizing it with RTN (add it to skip_modules to keep it in full precision)",
            RuntimeWarning,
            stacklevel=3,
        )
    quantize_linears_rtn(model, outside, config)
    return [ModuleLog(None, name, [name], None, None, "outside the decoder layers", None, 0.0, 0) for name in outside]


# Its forwards feed GPTQ's solves, defined on exact products: with the kernel's integer
# activations (AVX-512 builds only) the codes it writes would depend on the machine's build.
@exact_activations()
def quantize_gptq(
    model: nn.Module,
    config: QuantConfig,
    progress: bool = True,
    calib_ids: torch.Tensor | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    ranks: Ranks | None = None,
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
        ranks: the processes sharing the work (:class:`bitcliff.distributed.Ranks`); None for
            one.  Every rank passes the same model and windows and gets the same result; it is
            bit-identical to one process's when every rank holds the same power-of-two number
            of batches (see :class:`bitcliff.statistics.HessianAccumulator`).
    Returns:
        The same model with its linears replaced by :class:`QuantLinear`, its config attached
        and ``model.bitcliff_log`` holding one :class:`ModuleLog` per module.
    Raises:
        ValueError: bad config or calibration data, or an unsupported model structure.
    """
    if config.method != "gptq":
        raise ValueError(f"quantize_gptq needs config.method='gptq', got {config.method!r}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    ranks = ranks or Ranks.single()
    calib_ids = rank_share(check_calib_ids(calib_ids, config), batch_size, ranks)
    prefix, layers = find_decoder_layers(model)
    recorded = capture_calibration_inputs(model, layers, calib_ids, batch_size)
    entries: list[ModuleLog] = []
    hidden = recorded.inputs[0]
    groups = None
    bar = tqdm(range(len(layers)), desc=f"GPTQ {config.describe()}", disable=not (progress and ranks.writes),
               unit="layer")
    for i in bar:
        start = time.perf_counter()
        step = quantize_decoder_layer(layers[i], f"{prefix}.{i}", hidden, recorded.calls[i], config, groups, ranks)
        hidden, groups = step.outputs, step.groups
        entries.extend(step.log)
        report_layer(bar, i, step, time.perf_counter() - start)
    entries.extend(quantize_outside_layers_rtn(model, prefix, config))
    attach_config(model, config)
    setattr(model, LOG_ATTRIBUTE, entries)
    return model


def report_layer(bar, index: int, step: LayerStep, seconds: float) -> None:
    """Log one finished layer and show its total GPTQ loss on the progress bar."""
    losses = [e.loss for e in step.log if e.loss is not None]
    total = sum(losses) if losses else float("nan")
    log.info("layer %d: %d modules, GPTQ loss %.4g, %.1f s", index, len(step.log), total, seconds)
    bar.set_postfix(loss=f"{total:.3g}")


def gptq_log(model: nn.Module) -> list[ModuleLog] | None:
    """The per-module log of a model quantized by :func:`quantize_gptq` in memory, or None."""
    return getattr(model, LOG_ATTRIBUTE, None)


def write_gptq_log(entries: list[ModuleLog], directory: str | os.PathLike) -> Path:
    """Write the per-module log (:class:`ModuleLog` fields) as ``<directory>/gptq_log.json``."""
    return write_json(Path(directory) / LOG_FILE, [e.to_dict() for e in entries])
