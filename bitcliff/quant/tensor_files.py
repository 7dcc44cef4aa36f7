"""Reading safetensors files of a checkpoint safely: every failure a :class:`CheckpointError` that
names the file, and no tensor holding NaN or Inf let through (a model computed from it would give
``nan`` for every result).  Shared by the checkpoint reader and the side files repairs write
beside it (:mod:`bitcliff.quant.repair_files`)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from bitcliff.quant.finite import non_finite


class CheckpointError(ValueError):
    """A checkpoint folder that is incomplete, corrupt, or inconsistent with its config."""


class MissingShardError(CheckpointError, FileNotFoundError):
    """A weight file that a checkpoint's index lists is not there."""


def read_tensors(files: list[Path]) -> dict[str, torch.Tensor]:
    """All tensors of the shards; a truncated or corrupt file raises ``CheckpointError``."""
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                keys = list(f.keys())
                for key in keys:
                    tensors[key] = f.get_tensor(key)
        except Exception as exc:  # safetensors raises its own error types for bad headers/sizes
            raise CheckpointError(f"{path} could not be read (truncated or corrupt?): {exc}") from exc
        for key in keys:
            check_finite_tensor(tensors[key], f"{path}: tensor {key}")
    return tensors


def check_finite_tensor(tensor: torch.Tensor, what: str) -> None:
    """Refuse a floating-point tensor holding NaN or Inf (a model computed from it would give
    ``nan`` for every result): ``CheckpointError`` naming ``what`` and how many values."""
    bad = non_finite(tensor)
    if bad:
        raise CheckpointError(f"{what} holds {bad} NaN or Inf value(s) of {tensor.numel()}: the checkpoint is "
                              "damaged; quantize again, or restore the file from a copy")
