"""QuantizedWeight: the unpacked result of quantizing one linear layer."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bitcliff.kernels.pack import pack_qweight, pack_qzeros


@dataclass
class QuantizedWeight:
    """Codes and grid of one ``[N, K]`` linear weight, in GPTQ orientation.

    Attributes:
        codes: int32 ``[K, N]``, values in ``[0, 2**bits)``.
        scales: fp16 ``[n_groups, N]``.
        zeros: int32 ``[n_groups, N]``, true (v2) zero points in ``[0, 2**bits)``.
        g_idx: int32 ``[K]``, group of each input channel.
        bits: code width.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor
    bits: int

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dense ``[N, K]`` weight in ``dtype``."""
        g = self.g_idx.long()
        w = self.scales.float()[g] * (self.codes.float() - self.zeros.float()[g])
        return w.t().to(dtype)

    def packed(self) -> dict[str, torch.Tensor]:
        """GPTQ tensors: ``qweight``, ``qzeros`` (v2 zeros), ``scales``, ``g_idx``."""
        return {
            "qweight": pack_qweight(self.codes, self.bits),
            "qzeros": pack_qzeros(self.zeros, self.bits),
            "scales": self.scales.to(torch.float16).contiguous(),
            "g_idx": self.g_idx.to(torch.int32).contiguous(),
        }
