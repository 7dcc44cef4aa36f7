"""Finiteness of stored tensors: the one check that weights and stored factors hold no NaN or Inf."""

from __future__ import annotations

import torch


def non_finite(tensor: torch.Tensor) -> int:
    """How many NaN or Inf values ``tensor`` holds (0 for an integer tensor)."""
    if not tensor.is_floating_point():
        return 0
    return int((~torch.isfinite(tensor)).sum())


def check_finite(weight: torch.Tensor, name: str) -> None:
    """Raise ``ValueError`` naming the layer if ``weight`` holds NaN or Inf."""
    bad = non_finite(weight)
    if bad:
        raise ValueError(f"layer {name!r} has {bad} non-finite (NaN/Inf) weight values")
