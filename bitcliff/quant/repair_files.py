"""The files repairs store beside a checkpoint: sparse outliers (``outliers.safetensors``,
:mod:`bitcliff.quant.outliers`) and quantized low-rank factors (``lowrank.safetensors``,
:mod:`bitcliff.quant.factors`).  :func:`bitcliff.save` writes what these collect and
:func:`bitcliff.load` attaches what they read; a file that does not fit the checkpoint is refused.
(fp16 factors are a PEFT adapter instead, :mod:`bitcliff.quant.adapter`.)"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from bitcliff.quant.adapter import WEIGHTS_FILE as ADAPTER_WEIGHTS
from bitcliff.quant.factors import QuantizedFactors
from bitcliff.quant.outliers import SparseOutliers
from bitcliff.quant.qlinear import QuantLinear
from bitcliff.quant.tensor_files import CheckpointError, read_tensors


def outlier_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The sparse outliers of every ``QuantLinear`` that has some, as ``outliers.safetensors`` holds them."""
    tensors = {}
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear) and module.outliers() is not None:
            tensors.update({k: v.cpu() for k, v in module.outliers().tensors(name).items()})
    return tensors


def read_outliers(path: Path, shape_of) -> dict[str, SparseOutliers]:
    """The sparse outliers in ``path`` by module name.

    Args:
        shape_of: module name -> its ``(N, K)``; raises :class:`CheckpointError` for a module the
            checkpoint does not quantize.
    Raises:
        CheckpointError: an unreadable file, or corrections that do not fit their module.
    """
    tensors = read_tensors([path])
    found = {}
    for name in sorted({key.rpartition(".")[0] for key in tensors}):
        shape = shape_of(name)
        try:
            found[name] = SparseOutliers.from_tensors(tensors, name, shape)
        except (KeyError, ValueError) as exc:
            raise CheckpointError(f"{path}: the outliers of {name} do not fit the checkpoint ({exc})") from None
    return found


def load_outliers(model: nn.Module, path: Path) -> int:
    """Attach the sparse outliers in ``path`` to ``model``'s ``QuantLinear`` s; returns how many.

    Raises:
        CheckpointError: an unreadable file, a module the model lacks or that is not quantized,
            or corrections that do not fit their layer (a sparse file of another checkpoint).
    """
    modules = dict(model.named_modules())
    found = read_outliers(path, _shape_in(modules, path, "outliers"))
    for name, outliers in found.items():
        modules[name].set_outliers(outliers)
    return len(found)


def _shape_in(modules: dict, path: Path, what: str):
    """``shape_of`` for the readers: a module of ``modules`` that must be a ``QuantLinear``."""
    def shape_of(name: str) -> tuple[int, int]:
        module = modules.get(name)
        if not isinstance(module, QuantLinear):
            raise CheckpointError(f"{path}: it has {what} for {name}, which is not a quantized linear of the model")
        return module.out_features, module.in_features
    return shape_of


def factor_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The quantized low-rank factors of every ``QuantLinear`` that has some, as ``lowrank.safetensors`` holds them."""
    tensors = {}
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear) and module.lowrank_factors is not None:
            tensors.update(module.lowrank_factors.tensors(name))
    return tensors


def read_factors(path: Path, shape_of) -> dict[str, QuantizedFactors]:
    """The quantized low-rank factors in ``path`` by module name (``shape_of`` as for
    :func:`read_outliers`).

    Raises:
        CheckpointError: an unreadable file, or factors that do not fit their module.
    """
    tensors = read_tensors([path])
    found = {}
    for name in sorted({key.rsplit(".lora_", 1)[0] for key in tensors}):
        shape = shape_of(name)
        try:
            found[name] = QuantizedFactors.from_tensors(tensors, name, shape)
        except (KeyError, ValueError) as exc:
            raise CheckpointError(f"{path}: the low-rank factors of {name} do not fit the checkpoint "
                                  f"({type(exc).__name__}: {exc})") from None
    return found


def load_factors(model: nn.Module, path: Path) -> int:
    """Attach the quantized low-rank factors in ``path`` to ``model``'s ``QuantLinear`` s; returns how many.

    Raises:
        CheckpointError: an unreadable file, a module the model lacks or that is not quantized, a
            module that also has fp16 factors in the adapter, or factors that do not fit their
            layer (a file of another checkpoint).
    """
    modules = dict(model.named_modules())
    found = read_factors(path, _shape_in(modules, path, "low-rank factors"))
    for name, factors in found.items():
        if modules[name].lora_A is not None:
            raise CheckpointError(f"{path}: {name} also has low-rank factors in {ADAPTER_WEIGHTS}; a module holds one "
                                  "low-rank term")
        modules[name].set_quantized_lowrank(factors)
    return len(found)
