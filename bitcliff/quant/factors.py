"""Quantized low-rank factors: a low-rank term ``B A`` stored at 2-4 bits with group scales.

At equal bits, ``k``-bit factors hold about ``16 / k`` times the rank of fp16 ones, and on
SmolLM2's GPTQ W3 layers the extra rank removes more output error than the rounding of the
factors adds (docs/repair.md).  Both factors are quantized along their long side, like a
linear layer's weight: ``A`` (``[r, K]``) in groups of :data:`FACTOR_GROUP` input features, and
``Bᵀ`` (``[r, N]``) in groups of as many output features, each with an fp16 scale and an
integer zero point per group and row (round to nearest on an asymmetric grid).

Format: ``lowrank.safetensors`` beside a checkpoint, per module ``<name>`` and factor
``F`` in ``lora_A`` (``A``) and ``lora_B`` (``Bᵀ``), of ``C`` = K or N columns:

* ``<name>.F.qweight``: int32 ``[ceil(C / 32) * bits, r]``, the codes packed along ``C`` as a GPTQ
  ``qweight`` is packed along K (``bitcliff.kernels.pack``);
* ``<name>.F.scales``: fp16 ``[ceil(C / FACTOR_GROUP), r]``;
* ``<name>.F.zeros``: uint8 ``[ceil(C / FACTOR_GROUP), r]``.

The width follows from the shapes.  Why not a PEFT adapter: PEFT's LoRA holds floating factors
only; a reader that wants one gets it from :meth:`QuantizedFactors.dequantize`.  Why uint8 zero
points: packed along ``r`` (a handful of ranks) they would be padded to 32 codes per group, more
than the 8 bits a byte costs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bitcliff.kernels.pack import CODES_PER_UNIT, SUPPORTED_BITS, pack_rows, unpack_rows
from bitcliff.quant.config import QuantConfig
from bitcliff.quant.qweight import QuantizedWeight
from bitcliff.quant.rtn import quantize_rtn

#: The file beside a checkpoint's weights that holds its quantized low-rank factors.
FACTORS_FILE = "lowrank.safetensors"
#: Columns of a factor sharing one scale and zero point.
FACTOR_GROUP = 64
#: Widths a factor may be stored at: the packed widths, or 16 (fp16, as a PEFT adapter).
FACTOR_WIDTHS = (*SUPPORTED_BITS, 16)
#: Stored bits of a scale (fp16) and of a zero point (uint8).
_SCALE_BITS, _ZERO_BITS = 16, 8


def factor_matrix_bits(rank: int, columns: int, bits: int) -> int:
    """Stored bits of one ``[rank, columns]`` factor at ``bits`` (16: fp16): packed codes (the
    packing pads ``columns`` to whole units of 32 codes), and a scale and zero per group and row."""
    if bits == 16:
        return 16 * rank * columns
    units = -(-columns // CODES_PER_UNIT)
    groups = -(-columns // FACTOR_GROUP)
    return rank * (units * CODES_PER_UNIT * bits + groups * (_SCALE_BITS + _ZERO_BITS))


def quantize_factor(matrix: torch.Tensor, bits: int) -> QuantizedWeight:
    """Round a ``[r, C]`` factor to ``bits`` in groups of :data:`FACTOR_GROUP` along ``C``
    (the codes ``[C, r]``, as a ``[r, C]`` linear weight's)."""
    return quantize_rtn(matrix, QuantConfig(bits=bits, group_size=FACTOR_GROUP), name="<low-rank factor>")


@dataclass
class QuantizedFactors:
    """A module's low-rank term ``B A`` with both factors quantized.

    Attributes:
        a: ``A`` (``[r, K]``) as a :class:`QuantizedWeight` (codes int32 ``[K, r]``).
        b_t: ``Bᵀ`` (``[r, N]``) likewise (codes int32 ``[N, r]``).
        bits: their width (2, 3 or 4).
    """

    a: QuantizedWeight
    b_t: QuantizedWeight
    bits: int

    @property
    def rank(self) -> int:
        return self.a.codes.shape[1]

    @property
    def shape(self) -> tuple[int, int]:
        """``(N, K)`` of the module the term corrects."""
        return self.b_t.codes.shape[0], self.a.codes.shape[0]

    def dequantize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A fp32 [r, K], B fp32 [N, r])``."""
        return self.a.dequantize(), self.b_t.dequantize().t()

    def stored_bits(self) -> int:
        n, k = self.shape
        return factor_matrix_bits(self.rank, k, self.bits) + factor_matrix_bits(self.rank, n, self.bits)

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """The stored tensors of the module ``prefix`` (module docstring)."""
        out = {}
        for key, factor in (("lora_A", self.a), ("lora_B", self.b_t)):
            out[f"{prefix}.{key}.qweight"] = pack_rows(factor.codes, self.bits).cpu()
            out[f"{prefix}.{key}.scales"] = factor.scales.to(torch.float16).cpu().contiguous()
            out[f"{prefix}.{key}.zeros"] = factor.zeros.to(torch.uint8).cpu().contiguous()
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], prefix: str, shape: tuple[int, int]) -> "QuantizedFactors":
        """The factors of the ``[N, K]`` module ``prefix``, checked against its shape.

        Raises:
            KeyError: a tensor is missing.  ValueError: shapes that fit no width or not the module.
        """
        n, k = shape
        factors, widths = {}, set()
        for key, columns in (("lora_A", k), ("lora_B", n)):
            packed = tensors[f"{prefix}.{key}.qweight"]
            scales, zeros = tensors[f"{prefix}.{key}.scales"], tensors[f"{prefix}.{key}.zeros"]
            units, groups = -(-columns // CODES_PER_UNIT), -(-columns // FACTOR_GROUP)
            bits, rest = divmod(packed.shape[0], units)
            if packed.dim() != 2 or rest or bits not in FACTOR_WIDTHS[:-1]:
                raise ValueError(f"{key}.qweight of shape {tuple(packed.shape)} packs no 2-4 bit codes of "
                                 f"{columns} columns")
            rank = packed.shape[1]
            if tuple(scales.shape) != (groups, rank) or tuple(zeros.shape) != (groups, rank):
                raise ValueError(f"{key} needs scales and zeros of shape ({groups}, {rank}), got "
                                 f"{tuple(scales.shape)} and {tuple(zeros.shape)}")
            if zeros.numel() and int(zeros.max()) >= 2**bits:
                raise ValueError(f"{key} holds zero points beyond {bits} bits")
            codes = unpack_rows(packed, bits, columns)
            g_idx = torch.arange(columns, dtype=torch.int32) // FACTOR_GROUP
            factors[key] = QuantizedWeight(codes, scales.to(torch.float16), zeros.to(torch.int32), g_idx, bits)
            widths.add((bits, rank))
        if len(widths) != 1:
            raise ValueError(f"lora_A and lora_B differ in width or rank: {sorted(widths)}")
        return cls(factors["lora_A"], factors["lora_B"], widths.pop()[0])


def least_squares_b(error: torch.Tensor, covariance: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """fp32 ``[N, r]``: the ``B`` minimising ``tr((E − B A) C (E − B A)ᵀ)`` for a fixed ``A``
    (``[r, K]``): ``B = E C Aᵀ (A C Aᵀ)⁻¹``, with a tiny ridge on the ``r × r`` Gram matrix."""
    a, c = a.double(), covariance.double()
    gram = a @ c @ a.t()
    gram += 1e-9 * float(gram.diagonal().mean().clamp_min(1e-30)) * torch.eye(len(gram), dtype=gram.dtype,
                                                                              device=gram.device)
    cross = error.double() @ c @ a.t()  # [N, r]
    return torch.linalg.solve(gram, cross.t()).t().float()  # the Gram matrix is symmetric


def quantize_factors(a: torch.Tensor, b: torch.Tensor, bits: int, error: torch.Tensor | None = None,
                     covariance: torch.Tensor | None = None) -> QuantizedFactors:
    """Quantize the factors of ``B A`` (``a`` ``[r, K]``, ``b`` ``[N, r]``) to ``bits``.

    With the weight error ``error`` (``[N, K]``) and the input covariance ``covariance``
    (``[K, K]``) the term corrects, ``B`` is refitted to the rounded ``Â`` before it is rounded
    itself (:func:`least_squares_b`), so ``B`` absorbs what rounding ``A`` lost.
    """
    if bits not in FACTOR_WIDTHS[:-1]:
        raise ValueError(f"factor bits must be one of {FACTOR_WIDTHS[:-1]} to quantize, got {bits!r}")
    qa = quantize_factor(a.float(), bits)
    if error is not None and covariance is not None:
        b = least_squares_b(error, covariance, qa.dequantize())
    qb = quantize_factor(b.float().t().contiguous(), bits)
    return QuantizedFactors(qa, qb, bits)
