"""The compiled CPU path's weight layout, and its dequant-matmul (``cpu_kernel.cpp``).

The layout keeps every code packed, so a decode step reads about ``bits`` bits per weight plus
the group's fp16 scale and uint8 zero, and no dense copy of the weight is ever kept:

* **columns in blocks of 8** (one AVX2 register of fp32 lanes), each block's words contiguous in
  memory, so a block is one sequential stream for the prefetcher;
* **2 and 4 bits: 32 // bits codes per int32 word**, one column's consecutive K positions, LSB
  first (16 codes at 2 bits, 8 at 4), so that one shift and one mask line four codes up with the
  bytes of a 32-bit lane (the integer decode's byte dot products);
* **3 bits: two planes** per chunk of 32 positions, three words: the low two bits of positions
  0-15 and of 16-31 (as 2-bit words), and the 32 high bits, position ``p``'s at bit
  :func:`plane_bit` ``(p)`` so that the same shift-and-mask lines them up with the low bits'
  bytes.  Exactly 3 bits per weight (ten codes per word, the earlier layout, took 3.25-4.0 bits
  per weight at groups of 128-32 and could not take the integer decode);
* **every group starts on a new word**: a group of ``P`` positions takes ``ceil(P / (32 //
  bits))`` words (3 bits: ``3 * ceil(P / 32)``), its tail padded with zero codes that meet zero
  activations.  For the usual group sizes (multiples of 32) this costs nothing.

Built once per layer from the kernel layout (exact: the same codes, scales and zeros, tested
against the reference).  Act-order and padding are handled by gathering the activations into the
layout's position order, one index per position, ``[M, K]`` work per call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bitcliff.kernels.layout import HOST, KernelLayout, unpack_plane, width

BLOCK = 8  #: output columns per block (the kernel's ``BLOCK``)
#: Rows up to which the grouped form (no dense weight) runs; above, tiles of dequantized weight go
#: through the BLAS.  Measured on a 2-core Xeon (AVX-512 BLAS), M = 8-24, W4 g128: the tiles
#: overtake the grouped form at 12-16 rows on SmolLM2's layers and at 16-24 on Llama-3-8B's (on a
#: 2-core AVX2 EPYC, before the tiles, the grouped form had stayed faster up to 48 rows on
#: weights larger than one slab).
GEMV_MAX_ROWS = 16
#: Columns repacked at a time when a layout is built (its int64 codes stay under ~100 MB at K = 4096).
PACK_COLUMNS = 2048
#: Most bytes of fp32 weight the many-rows schedule dequantizes at once, per thread (a slab of K
#: positions of one tile of columns): half of a 2 MiB L2, 1-2 MiB measured best at M = 64-512.
SLAB_BYTES = 2**20
#: The integer variant's activations: ``|round(x / d)| <= ACT_LEVELS`` (the kernel's ``ACT_LEVELS``:
#: the largest integer that splits into a high and a low signed byte, ``128 h + l``).
ACT_LEVELS = 16319
#: Groups of up to this many positions take the integer variant (its int32 sums cannot overflow).
INT_MAX_POSITIONS = 256
#: Rows up to which the integer variant runs (the kernel's ``INT_MAX_ROWS``; from 8 rows on the
#: fp32 form, which decodes the weights once per 8 rows, was as fast).
INT_MAX_ROWS = 4
#: The constants above as the compiled kernel returns them (``constants()``); the loader refuses a
#: build that disagrees, so the reference and the layout cannot drift from the kernel.
KERNEL_CONSTANTS = (BLOCK, ACT_LEVELS, INT_MAX_POSITIONS, INT_MAX_ROWS)


@dataclass(frozen=True)
class PackedLayout:
    """One linear layer's weight as the compiled CPU kernel reads it.

    Attributes:
        bits: 2, 3 or 4.
        in_features: K.
        out_features: N (the layout pads it to a multiple of :data:`BLOCK` with zero scales).
        words: int32 ``[ceil(N / 8), G * WPG, 8]``: block, word row, column in block.
        scales: fp16 ``[ceil(N / 8), G, 8]``.
        zeros: uint8 ``[ceil(N / 8), G, 8]``, true (v2) zero points.
        columns: int64 ``[positions]``, the activation column read at each position
            (``K``, a zero column, for padding); ``None`` when positions are columns ``0..K-1``
            then padding.
    """

    bits: int
    in_features: int
    out_features: int
    words: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    columns: torch.Tensor | None

    @property
    def device(self) -> torch.device:
        return self.words.device

    @property
    def positions(self) -> int:
        """K positions the kernel walks (groups times their padded size)."""
        return self.words.shape[1] * 32 // self.bits

    @property
    def n_groups(self) -> int:
        return self.scales.shape[1]

    def nbytes(self) -> int:
        """Bytes the kernel reads for the weight."""
        return sum(t.numel() * t.element_size() for t in (self.words, self.scales, self.zeros))


def plane_bit(p: int) -> int:
    """The bit of a 3-bit chunk's third word that holds position ``p``'s (0-31) high bit: byte
    ``p % 16 // 4``, bit ``p % 4`` for positions 0-15 and ``4 + p % 4`` for 16-31 (the kernel's
    ``plane_bit``)."""
    return 8 * (p % 16 // 4) + p % 4 + 4 * (p // 16)


def group_words(bits: int, slot: int) -> int:
    """Words a group of ``slot`` positions takes in one column."""
    return 3 * -(-slot // 32) if bits == 3 else -(-slot // (32 // bits))


def _words(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """int64 ``[G * WPG, C]`` words (each < 2^32) of codes ``[G, P, C]``, ``P`` a whole number of words."""
    groups, positions, columns = codes.shape
    if bits == 3:
        chunks = codes.view(groups, positions // 32, 32, columns)
        low_shifts = (2 * torch.arange(16, dtype=torch.int64, device=codes.device)).view(1, 1, 16, 1)
        high_shifts = torch.tensor([plane_bit(p) for p in range(32)], dtype=torch.int64,
                                   device=codes.device).view(1, 1, 32, 1)
        low = chunks & 3  # disjoint fields below: the sums are ORs
        words = torch.stack([(low[:, :, :16] << low_shifts).sum(dim=2), (low[:, :, 16:] << low_shifts).sum(dim=2),
                             ((chunks >> 2) << high_shifts).sum(dim=2)], dim=2)  # [G, chunks, 3, C]
        return words.view(-1, columns)
    per_word = 32 // bits
    shifts = (bits * torch.arange(per_word, dtype=torch.int64, device=codes.device)).view(1, 1, per_word, 1)
    return (codes.view(groups, positions // per_word, per_word, columns) << shifts).sum(dim=2).view(-1, columns)


def _blocked(t: torch.Tensor, n_padded: int) -> torch.Tensor:
    """``[R, N]`` -> ``[ceil(N/8), R, 8]``, columns padded with zeros."""
    rows, n = t.shape
    padded = torch.nn.functional.pad(t, (0, n_padded - n))
    return padded.view(rows, n_padded // BLOCK, BLOCK).permute(1, 0, 2).contiguous()


def pack(layout: KernelLayout) -> PackedLayout:
    """The compiled kernel's form of a kernel layout (exact: the same codes, scales and zeros).

    Raises ``ValueError`` for scales that are not fp16 (the kernel reads fp16 scales).
    """
    if layout.scales.dtype != torch.float16:
        raise ValueError(f"the compiled CPU kernel reads fp16 scales, got {layout.scales.dtype}")
    bits, n, k = layout.bits, layout.out_features, layout.in_features
    groups = layout.n_groups
    slot = layout.k_padded if layout.group_size == -1 else layout.group_size
    words_per_group = group_words(bits, slot)
    padded_slot = words_per_group * 32 // bits
    n_padded = -(-n // BLOCK) * BLOCK

    spec = width(bits)
    words = torch.empty(groups * words_per_group, n, dtype=torch.int32, device=HOST)
    for first in range(0, n, PACK_COLUMNS):  # int64 codes of a few columns at a time: bounded memory
        last = min(n, first + PACK_COLUMNS)
        part = unpack_plane(layout.lo[:, first:last].cpu(), spec.lo)
        if layout.hi is not None:
            part = part | (unpack_plane(layout.hi[:, first:last].cpu(), spec.hi) << spec.lo)
        codes = torch.zeros(groups * slot, last - first, dtype=torch.int64, device=HOST)
        codes[: layout.k_padded] = part
        codes = torch.nn.functional.pad(codes.view(groups, slot, -1), (0, 0, 0, padded_slot - slot))
        packed = _words(codes, bits)
        words[:, first:last] = torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)

    source = torch.full((groups * slot,), -1, dtype=torch.int64, device=HOST)
    source[: layout.k_padded] = layout.source_columns()
    source = torch.nn.functional.pad(source.view(groups, slot), (0, padded_slot - slot), value=-1).flatten()
    source = torch.where(source >= 0, source, torch.full_like(source, k))
    identity = bool(torch.equal(source[:k], torch.arange(k, device=HOST))) and bool((source[k:] == k).all())
    return PackedLayout(
        bits=bits,
        in_features=k,
        out_features=n,
        words=_blocked(words, n_padded).to(layout.device),
        scales=_blocked(layout.scales.cpu(), n_padded).to(layout.device),
        zeros=_blocked(layout.zeros.cpu(), n_padded).to(layout.device),
        columns=None if identity else source.to(layout.device),
    )


def linear(x: torch.Tensor, layout: PackedLayout, bias: torch.Tensor | None, ops, *,
           integer_activations: bool = True) -> torch.Tensor:
    """``x @ dequant(W)ᵀ (+ bias)``: ``x`` ``[..., K]`` (any float dtype, computed in fp32) to
    ``[..., N]`` in ``x.dtype``, through the compiled operator ``ops.linear`` (one call: the
    gather to the layout's positions, the schedule for the row count, the bias and the cast).

    With ``integer_activations`` (the default), the rows :func:`takes_integer_activations` names
    (decode everywhere, every row count in a build with AVX-512 VNNI) are multiplied as integers:
    ``x`` rounded per row and group to 15 bits, exactly :func:`rounded_activations` ``@
    dequant(W)ᵀ`` up to fp32 rounding.  False keeps every product in fp32.
    """
    return ops.linear(x, layout.words, layout.scales, layout.zeros, layout.columns, bias, layout.bits,
                      layout.in_features, layout.out_features, GEMV_MAX_ROWS, SLAB_BYTES, integer_activations)


def takes_integer_activations(layout: PackedLayout, rows: int, ops) -> bool:
    """Whether the kernel ``ops`` multiplies ``rows`` rows by this weight with integer activations:
    groups of at most :data:`INT_MAX_POSITIONS` positions, and any number of rows where the build
    has the many-rows integer product (``ops.integer_gemm()``: AVX-512 with VNNI), else at most
    :data:`INT_MAX_ROWS`.  The kernel's own rule."""
    return layout.positions // layout.n_groups <= INT_MAX_POSITIONS and (rows <= INT_MAX_ROWS or ops.integer_gemm())


def rounded_activations(x: torch.Tensor, layout: PackedLayout, levels: int = ACT_LEVELS) -> torch.Tensor:
    """The reference for the kernel's integer variant: fp32 ``[M, K]``, ``x`` ``[M, K]`` with each
    row's values in each of the weight's groups (at the layout's positions, act-order included)
    rounded to ``d * round(x / d)``, ``d = max|x| / levels`` over the group (the kernel's
    ``ACT_LEVELS``; ``bench.activation_rounding`` also tries 127, 8-bit activations)."""
    xf = x.float()
    rows, k = xf.shape
    positions = layout.columns if layout.columns is not None else torch.arange(layout.positions, device=x.device)
    padded = torch.cat([xf, xf.new_zeros(rows, 1)], dim=1)
    grouped = padded[:, positions.clamp(max=k)].view(rows, layout.n_groups, -1)  # [M, G, P], padding reads 0
    step = grouped.abs().amax(dim=-1, keepdim=True) / levels
    rounded = torch.where(step > 0, torch.round(grouped / torch.where(step > 0, step, 1.0)) * step, 0.0)
    out = xf.new_zeros(rows, k + 1)
    out[:, positions.clamp(max=k)] = rounded.view(rows, -1)
    return out[:, :k]


def dense_weight(layout: PackedLayout, ops) -> torch.Tensor:
    """fp32 ``[positions, N]``: ``(q - z) * s`` at every position, as the kernel forms it."""
    dense = ops.dequantize(layout.words, layout.scales, layout.zeros, layout.bits)
    return dense[:, : layout.out_features]
