"""Module surgery: which linears a config selects, swapping modules by name, and the settings a
quantized model carries.

A quantized model carries its :class:`QuantConfig` as the attribute ``bitcliff_config``
(:data:`CONFIG_ATTRIBUTE`); :func:`attach_config` sets it and :func:`quant_config` reads it, and
nothing else touches the attribute.
"""

from __future__ import annotations

from fnmatch import fnmatch

from torch import nn
from tqdm.auto import tqdm

from bitcliff.layers import set_submodule  # noqa: F401 - where quant's callers find it
from bitcliff.quant.config import QuantConfig
from bitcliff.quant.qlinear import QuantLinear
from bitcliff.quant.rtn import quantize_rtn

CONFIG_ATTRIBUTE = "bitcliff_config"


def is_skipped(name: str, config: QuantConfig) -> bool:
    """Whether module ``name`` matches one of ``config.skip_modules`` (fnmatch patterns, or a
    last name component such as ``lm_head``)."""
    return any(fnmatch(name, pattern) or name.split(".")[-1] == pattern for pattern in config.skip_modules)


def quantizable_linears(model: nn.Module, config: QuantConfig, prefix: str = "") -> list[tuple[str, nn.Linear]]:
    """The ``(name, module)`` pairs of plain ``nn.Linear`` s that ``config`` selects, in module
    order; names are relative to ``model`` and matched against the skip rules as
    ``prefix + name`` (``prefix``: where ``model`` sits in the whole model, e.g. ``"model.layers.3."``)."""
    return [
        (name, module)
        for name, module in model.named_modules()
        if type(module) is nn.Linear and not is_skipped(prefix + name, config)
    ]


def attach_config(model: nn.Module, config: QuantConfig) -> None:
    """Record how ``model`` was quantized (read back by :func:`quant_config`)."""
    setattr(model, CONFIG_ATTRIBUTE, config)


def quant_config(model: nn.Module) -> QuantConfig | None:
    """The :class:`QuantConfig` a quantized model carries, or None for a model bitcliff did not
    quantize or load."""
    config = getattr(model, CONFIG_ATTRIBUTE, None)
    return config if isinstance(config, QuantConfig) else None


def quantize_linears_rtn(model: nn.Module, names: list[str], config: QuantConfig, progress: bool = False) -> None:
    """Replace the ``nn.Linear`` s of ``model`` named ``names`` by RTN ``QuantLinear`` s, in place."""
    for name in tqdm(names, desc=f"RTN {config.describe()}", disable=not progress, unit="layer"):
        linear, own = model.get_submodule(name), config.for_module(name)
        qlinear = QuantLinear.from_quantized(quantize_rtn(linear.weight, own, name), own.group_size, linear.bias, name)
        set_submodule(model, name, qlinear.to(linear.weight.device))
