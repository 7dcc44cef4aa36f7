"""``quantize(model, config)``: replace a model's ``nn.Linear`` layers by ``QuantLinear``."""

from __future__ import annotations

from torch import nn

from bitcliff.quant.config import QuantConfig
from bitcliff.quant.gptq_model import quantize_gptq
from bitcliff.quant.surgery import attach_config, quantizable_linears, quantize_linears_rtn


def quantize(model: nn.Module, config: QuantConfig, progress: bool = True, **gptq_inputs) -> nn.Module:
    """Quantize ``model``'s linear layers in place and return it.

    Args:
        model: a transformers causal LM (or any module with ``nn.Linear`` children).
        config: the quantization settings; ``config.method`` picks RTN or GPTQ.
        progress: show a tqdm bar.
        gptq_inputs: for ``method="gptq"``, the calibration windows ``calib_ids`` (int64
            ``[n_windows, seq_len]``) and optionally ``batch_size`` and ``ranks``
            (:func:`bitcliff.quant.gptq_model.quantize_gptq`); RTN ignores them (every rank
            rounds the same weights alike).
    Returns:
        The same model, with every selected ``nn.Linear`` replaced by a :class:`QuantLinear`.
    """
    if config.method == "gptq":
        return quantize_gptq(model, config, progress=progress, **gptq_inputs)
    unknown = set(gptq_inputs) - {"calib_ids", "batch_size", "ranks"}  # calibration data is simply not needed
    if unknown:
        raise TypeError(f"quantize() got unexpected keyword arguments: {', '.join(sorted(unknown))}")
    targets = [name for name, _ in quantizable_linears(model, config)]
    if not targets:
        raise ValueError("the model has no nn.Linear layers left to quantize with this config")
    quantize_linears_rtn(model, targets, config, progress=progress)
    attach_config(model, config)
    return model


def quantize_on_text(model: nn.Module, tokenizer, config: QuantConfig, text: str, seq_len: int,
                     ranks=None) -> nn.Module:
    """:func:`quantize` in place, GPTQ calibrated on the head of ``text`` (an embedded name or a
    file) over ``ranks`` (:class:`bitcliff.distributed.Ranks`, None for one process); returns it."""
    if config.method != "gptq":
        return quantize(model, config)
    from bitcliff.assets import load_text  # noqa: PLC0415 - the assets load lazily
    from bitcliff.data import calibration_windows  # noqa: PLC0415

    calib = calibration_windows(tokenizer, load_text(text), config.calib_samples, seq_len)
    return quantize(model, config, calib_ids=calib, ranks=ranks)
