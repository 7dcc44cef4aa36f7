"""Plain-PyTorch reference for every kernel: this file *defines* what the kernels compute.

Weights follow the GPTQ convention ``W[n, k] = scales[g_idx[k], n] * (q[k, n] - zeros[g_idx[k], n])``
with ``zeros`` the true (v2) zero points.  Arithmetic is done in float32 and the result is cast
to the requested dtype, so the reference is as exact as the stored fp16 scales allow.
"""

from __future__ import annotations

from enum import Enum

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


# --- Error capture ------------------------------------------------------------------------------


class CaptureMode(str, Enum):
    """What a dequant-matmul reports per token beside ``y`` (the one declaration of the modes).

    Every signal is fp32 ``[tokens]``, tokens being the rows of ``x.reshape(-1, K)``:

    * ``NONE``: nothing;
    * ``STATS``: ``sq_norm = sum(y**2)`` and ``abs_max = max|y|`` over the output features;
    * ``ERROR``: ``err_sq = ||y_q - y_fp||**2`` and ``fp_sq = ||y_fp||**2``, ``y_fp`` from the
      full-precision weight on the same input.
    """

    NONE = "none"
    STATS = "stats"
    ERROR = "error"

    @classmethod
    def parse(cls, value) -> "CaptureMode":
        """``value`` (a mode or its name) as a mode; a clear ``ValueError`` for anything else."""
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"capture mode must be one of {[m.value for m in cls]}, got {value!r}") from None

    @property
    def signals(self) -> tuple[str, ...]:
        """The names of the two signals (none for ``NONE``), in the order the kernels return them."""
        return {"none": (), "stats": ("sq_norm", "abs_max"), "error": ("err_sq", "fp_sq")}[self.value]


def output_stats(y: torch.Tensor) -> dict[str, torch.Tensor]:
    """``stats`` capture of an output ``y [..., N]`` (as returned, i.e. in its own dtype).

    Returns:
        ``sq_norm``: ``sum(y**2)`` and ``abs_max``: ``max|y|`` per token, fp32 ``[tokens]``.
    """
    rows = y.reshape(-1, y.shape[-1]).float()
    return {"sq_norm": (rows * rows).sum(dim=1), "abs_max": rows.abs().amax(dim=1)}


def output_error(
    x: torch.Tensor,
    weight_q: torch.Tensor,
    weight_fp: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """``error`` capture: how far the quantized layer's output is from the full-precision one.

    Both outputs are the float32 accumulators ``x @ Wᵀ + bias`` (before rounding to x's dtype),
    so the signal measures the weight quantization alone.

    Args:
        x: ``[..., K]`` activations.
        weight_q: dequantized weight ``[N, K]``.
        weight_fp: full-precision weight ``[N, K]``.
        bias: optional ``[N]`` (in both outputs).
    Returns:
        ``err_sq``: ``||y_q - y_fp||**2`` and ``fp_sq``: ``||y_fp||**2`` per token, fp32 ``[tokens]``.
    """
    if weight_q.shape != weight_fp.shape:
        raise ValueError(
            f"weight_fp has shape {tuple(weight_fp.shape)}, the quantized weight {tuple(weight_q.shape)}"
        )
    xf = x.reshape(-1, x.shape[-1]).float()
    y_q = xf @ weight_q.float().t()
    y_fp = xf @ weight_fp.float().t()
    if bias is not None:
        y_q = y_q + bias.float()
        y_fp = y_fp + bias.float()
    d = y_q - y_fp
    return {"err_sq": (d * d).sum(dim=1), "fp_sq": (y_fp * y_fp).sum(dim=1)}
