"""Round-to-nearest (RTN) quantization of one weight matrix (a model's linears:
``surgery.quantize_linears_rtn``)."""

from __future__ import annotations

import torch

from bitcliff.kernels.pack import default_g_idx, num_groups
from bitcliff.quant.config import QuantConfig
from bitcliff.quant.finite import check_finite
from bitcliff.quant.grid import fit_grid, quantize_codes
from bitcliff.quant.qweight import QuantizedWeight


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
