"""Plain-PyTorch reference for every kernel: this file *defines* what the kernels compute.

Weights follow the GPTQ convention ``W[n, k] = scales[g_idx[k], n] * (q[k, n] - zeros[g_idx[k], n])``
with ``zeros`` the true (v2) zero points.  Arithmetic is done in float32 and the result is cast
to the requested dtype, so the reference is as exact as the stored fp16 scales allow.
"""

from __future__ import annotations

import torch

from bitcliff.kernels.pack import unpack_qweight, unpack_qzeros


def dequantize(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Dequantize GPTQ tensors to a dense weight.

    Args:
        qweight: int32 ``[K*bits/32, N]``, codes packed along K.
        qzeros: int32 ``[n_groups, N*bits/32]``, true (v2) zero points packed along N.
        scales: fp16/bf16/fp32 ``[n_groups, N]``.
        g_idx: int32 ``[K]``, group of each input channel.
        bits: 2, 3 or 4.
        dtype: dtype of the result.
    Returns:
        ``[N, K]`` weight in ``dtype`` (the ``nn.Linear`` orientation).
    """
    in_features = g_idx.numel()
    out_features = scales.shape[1]
    codes = unpack_qweight(qweight, bits, in_features)  # [K, N]
    zeros = unpack_qzeros(qzeros, bits, out_features)  # [G, N]
    g = g_idx.long()
    weight_kn = scales.float()[g] * (codes.float() - zeros.float()[g])
    return weight_kn.t().to(dtype)


def dequant_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y = x @ dequant(W)ᵀ + bias`` in float32, returned in ``x.dtype``.

    Args:
        x: ``[..., K]`` activations (fp16/bf16/fp32).
        qweight, qzeros, scales, g_idx, bits: as in :func:`dequantize`.
        bias: optional ``[N]``.
    Returns:
        ``[..., N]`` in ``x.dtype``.
    """
    weight = dequantize(qweight, qzeros, scales, g_idx, bits, torch.float32)
    y = x.float() @ weight.t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
