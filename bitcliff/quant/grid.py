"""The integer quantization grid shared by RTN and GPTQ.

A group of weights maps to codes ``q = clamp(round(w / scale) + zero, 0, maxq)`` and back to
``scale * (q - zero)``.  The zero point is an *integer* in ``[0, maxq]`` (the GPTQ checkpoint
format stores it as a code), and the range always contains 0 so that zero weights stay exact.
Scales are rounded to fp16 before the codes are computed, because fp16 is what the
checkpoint stores: codes chosen against an unrounded scale would not be the nearest ones for
the scale that is actually used.
"""

from __future__ import annotations

import functools

import torch


@functools.cache
def mse_grid() -> tuple[float, ...]:
    """Shrink factors tried by the MSE clipping search, from the full range down to 20% of it.

    Computed on first use, not on import: importing bitcliff runs no CPU operation, so that the
    CPU paths can still be pinned afterwards (:mod:`bitcliff.numerics`)."""
    return tuple(torch.linspace(1.0, 0.2, 81).tolist())


def _range_to_grid(
    wmin: torch.Tensor, wmax: torch.Tensor, bits: int, sym: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    maxq = 2**bits - 1
    wmin = torch.minimum(wmin, torch.zeros_like(wmin))
    wmax = torch.maximum(wmax, torch.zeros_like(wmax))
    if sym:
        wmax = torch.maximum(wmin.abs(), wmax)
        wmin = -wmax
    span = wmax - wmin
    # An all-zero group: any positive scale represents it exactly.
    span = torch.where(span > 0, span, torch.ones_like(span))
    scale = (span / maxq).half().float()
    scale = torch.where(scale > 0, scale, torch.full_like(scale, 2.0**-24))  # fp16 underflow
    if sym:
        zero = torch.full_like(scale, float((maxq + 1) // 2))
    else:
        zero = torch.clamp(torch.round(-wmin / scale), 0, maxq)
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Codes of ``w`` on the grid.  ``w``: ``[R, C]``; ``scale``/``zero``: ``[R, 1]`` or ``[R, C]``."""
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


def fit_grid(
    w: torch.Tensor, bits: int, sym: bool, mse: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit one grid per row of ``w``.

    Args:
        w: float32 ``[R, C]``: each row is one group (e.g. one output channel's slice of K).
        bits: code width.
        sym: symmetric grid.
        mse: shrink the range per row to minimize the squared reconstruction error.
    Returns:
        ``(scale, zero)``, float32 ``[R]`` each; ``zero`` holds integers in ``[0, 2**bits)``.
    """
    w = w.float()
    wmin, wmax = w.min(dim=1).values, w.max(dim=1).values
    scale, zero = _range_to_grid(wmin, wmax, bits, sym)
    if not mse:
        return scale, zero
    maxq = 2**bits - 1
    best_err = torch.full_like(scale, float("inf"))
    for shrink in mse_grid():
        s, z = _range_to_grid(wmin * shrink, wmax * shrink, bits, sym)
        q = quantize_codes(w, s[:, None], z[:, None], maxq)
        err = ((s[:, None] * (q - z[:, None]) - w) ** 2).sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        scale = torch.where(better, s, scale)
        zero = torch.where(better, z, zero)
    return scale, zero
