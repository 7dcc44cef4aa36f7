"""Whole-model conversion: replace a model's ``nn.Linear`` layers by ``QuantLinear``."""

from __future__ import annotations

from fnmatch import fnmatch

from torch import nn
from tqdm.auto import tqdm

from bitcliff.quant.config import QuantConfig
from bitcliff.quant.qlinear import QuantLinear
from bitcliff.quant.rtn import quantize_rtn


def is_skipped(name: str, config: QuantConfig) -> bool:
    """Whether module ``name`` matches one of ``config.skip_modules`` (fnmatch patterns)."""
    return any(fnmatch(name, pattern) or name.split(".")[-1] == pattern for pattern in config.skip_modules)


def quantizable_linears(model: nn.Module, config: QuantConfig) -> list[tuple[str, nn.Linear]]:
    """The ``(name, module)`` pairs that :func:`quantize` converts, in module order."""
    return [
        (name, module)
        for name, module in model.named_modules()
        if type(module) is nn.Linear and not is_skipped(name, config)
    ]


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def attach_config(model: nn.Module, config: QuantConfig) -> None:
    """Record the config on the model (``model.bitcliff_config``) for saving and reporting."""
    model.bitcliff_config = config


def quantize(model: nn.Module, config: QuantConfig, progress: bool = True, **gptq_inputs) -> nn.Module:
    """Quantize ``model``'s linear layers in place and return it.

    Args:
        model: a transformers causal LM (or any module with ``nn.Linear`` children).
        config: the quantization settings.
        progress: show a tqdm bar.
        gptq_inputs: for ``method="gptq"``, the calibration input (``calib_ids``).
    Returns:
        The same model, with every selected ``nn.Linear`` replaced by a :class:`QuantLinear`.
    """
    if config.method == "gptq":
        from bitcliff.quant.gptq_model import quantize_gptq  # noqa: PLC0415 (optional heavy path)

        return quantize_gptq(model, config, progress=progress, **gptq_inputs)
    targets = quantizable_linears(model, config)
    if not targets:
        raise ValueError("the model has no nn.Linear layers left to quantize with this config")
    for name, linear in tqdm(targets, desc=f"RTN {config.describe()}", disable=not progress, unit="layer"):
        qw = quantize_rtn(linear.weight, config, name)
        qlinear = QuantLinear.from_quantized(qw, config.group_size, linear.bias, name)
        set_submodule(model, name, qlinear.to(linear.weight.device))
    attach_config(model, config)
    return model
