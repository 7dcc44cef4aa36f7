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


def load_outliers(model: nn.Module, path: Path) -> int:
    """Attach the sparse outliers in ``path`` to ``model``'s ``QuantLinear`` s; returns how many.

    Raises:
        CheckpointError: an unreadable file, a module the model lacks or that is not quantized,
            or corrections that do not fit their layer (a sparse file of another checkpoint).
    """
    tensors = read_tensors([path])
    modules = dict(model.named_modules())
    names = sorted({key.rpartition(".")[0] for key in tensors})
    for name in names:
        module = modules.get(name)
        if not isinstance(module, QuantLinear):
            raise CheckpointError(f"{path}: it has outliers for {name}, which is not a quantized linear of the model")
        try:
            module.set_outliers(SparseOutliers.from_tensors(tensors, name, (module.out_features, module.in_features)))
        except (KeyError, ValueError) as exc:
            raise CheckpointError(f"{path}: the outliers of {name} do not fit the checkpoint ({exc})") from None
    return len(names)


def factor_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The quantized low-rank factors of every ``QuantLinear`` that has some, as ``lowrank.safetensors`` holds them."""
    tensors = {}
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear) and module.lowrank_factors is not None:
            tensors.update(module.lowrank_factors.tensors(name))
    return tensors


def load_factors(model: nn.Module, path: Path) -> int:
    """Attach the quantized low-rank factors in ``path`` to ``model``'s ``QuantLinear`` s; returns how many.

    Raises:
        CheckpointError: an unreadable file, a module the model lacks or that is not quantized, a
            module that also has fp16 factors in the adapter, or factors that do not fit their
            layer (a file of another checkpoint).
    """
    tensors = read_tensors([path])
    modules = dict(model.named_modules())
    names = sorted({key.rsplit(".lora_", 1)[0] for key in tensors})
    for name in names:
        module = modules.get(name)
        if not isinstance(module, QuantLinear):
            raise CheckpointError(f"{path}: it has low-rank factors for {name}, which is not a quantized linear of "
                                  "the model")
        if module.lora_A is not None:
            raise CheckpointError(f"{path}: {name} also has low-rank factors in {ADAPTER_WEIGHTS}; a module holds one "
                                  "low-rank term")
        try:
            module.set_quantized_lowrank(QuantizedFactors.from_tensors(
                tensors, name, (module.out_features, module.in_features)))
        except (KeyError, ValueError) as exc:
            raise CheckpointError(f"{path}: the low-rank factors of {name} do not fit the checkpoint "
                                  f"({type(exc).__name__}: {exc})") from None
    return len(names)
