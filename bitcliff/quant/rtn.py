"""Round-to-nearest (RTN) quantization: of one weight matrix, and of a model's linears."""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from bitcliff.kernels.pack import default_g_idx, num_groups
from bitcliff.quant.config import QuantConfig
from bitcliff.quant.grid import fit_grid, quantize_codes
from bitcliff.quant.qlinear import QuantLinear
from bitcliff.quant.qweight import QuantizedWeight
from bitcliff.quant.surgery import set_submodule


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


def quantize_rtn(weight: torch.Tensor, config: QuantConfig, name: str = "<weight>") -> QuantizedWeight:
    """Quantize a linear weight by rounding each group to its nearest grid point.

    Args:
        weight: ``[N, K]`` float weight (``nn.Linear`` orientation).
        config: bits, group size, symmetry, MSE clipping.
        name: layer name used in error messages.
    Returns:
        The layer's :class:`QuantizedWeight` with contiguous groups along K (the last group
        partial when ``group_size`` does not divide K).
    """
    check_finite(weight, name)
    w = weight.detach().float()
    out_features, in_features = w.shape
    n_groups = num_groups(in_features, config.group_size)
    group = in_features if config.group_size == -1 else config.group_size
    codes = torch.empty(in_features, out_features, dtype=torch.int32, device=w.device)
    scales = torch.empty(n_groups, out_features, dtype=torch.float16, device=w.device)
    zeros = torch.empty(n_groups, out_features, dtype=torch.int32, device=w.device)
    for g in range(n_groups):
        cols = slice(g * group, min((g + 1) * group, in_features))
        block = w[:, cols]  # [N, group]
        scale, zero = fit_grid(block, config.bits, config.sym, config.mse)
        q = quantize_codes(block, scale[:, None], zero[:, None], config.maxq)
        codes[cols] = q.t().to(torch.int32)
        scales[g] = scale.half()
        zeros[g] = zero.to(torch.int32)
    return QuantizedWeight(codes, scales, zeros, default_g_idx(in_features, config.group_size, w.device), config.bits)


def quantize_linears_rtn(model: nn.Module, names: list[str], config: QuantConfig, progress: bool = False) -> None:
    """Replace the ``nn.Linear`` s of ``model`` named ``names`` by RTN ``QuantLinear`` s, in place."""
    for name in tqdm(names, desc=f"RTN {config.describe()}", disable=not progress, unit="layer"):
        linear, own = model.get_submodule(name), config.for_module(name)
        qlinear = QuantLinear.from_quantized(quantize_rtn(linear.weight, own, name), own.group_size, linear.bias, name)
        set_submodule(model, name, qlinear.to(linear.weight.device))
