"""Bit packing in the GPTQ checkpoint layout.

GPTQ stores b-bit codes as a little-endian *bit stream* inside int32 words:
code ``i`` occupies stream bits ``[i*b, (i+1)*b)`` and word ``w`` holds stream bits
``[32w, 32w+32)``, least significant bit first.  For b = 2 and 4 this is the familiar
"16 (8) codes per word"; for b = 3 it is the original GPTQ layout where 32 codes fill
3 words and codes 10 and 21 straddle a word boundary.  One bit-stream formulation covers
all three widths, so there is no per-bit-width code path here.

``qweight`` packs along the input dim K (rows of the ``[K, N]`` code matrix), ``qzeros``
packs along the output dim N (columns of the ``[n_groups, N]`` zero matrix).

Lengths that are not a multiple of 32 codes are padded with zero codes up to the next
whole 32-code unit (``32*b/32 = b`` words).  Real checkpoints always have K and N that
are multiples of 32; the padding only makes the functions total, and ``unpack`` needs
the true length back to drop it.
"""

from __future__ import annotations

import torch

#: The code widths bitcliff packs, quantizes, loads and runs: the one list of widths.  Everything
#: else about a width (its bit planes in the kernel layout, how the GPU decodes it, what a restored
#: module gets) is derived from it (``layout.width``).
SUPPORTED_BITS = (2, 3, 4)
CODES_PER_UNIT = 32  # one packing unit = 32 codes = `bits` int32 words


def widths_text() -> str:
    """``"2, 3 or 4"``: the supported widths, for messages and help."""
    *head, last = (str(b) for b in SUPPORTED_BITS)
    return f"{', '.join(head)} or {last}" if head else last


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")


def packed_length(length: int, bits: int) -> int:
    """Number of int32 words that hold ``length`` codes of ``bits`` bits (padded)."""
    _check_bits(bits)
    units = -(-length // CODES_PER_UNIT)
    return units * bits


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """Reinterpret uint32 values held in int64 as int32 (two's complement)."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes along dim 0.

    Args:
        codes: integer tensor ``[L, C]`` with values in ``[0, 2**bits)``.
        bits: 2, 3 or 4.
    Returns:
        int32 tensor ``[packed_length(L, bits), C]``.
    """
    _check_bits(bits)
    if codes.dim() != 2:
        raise ValueError(f"codes must be 2-D [L, C], got shape {tuple(codes.shape)}")
    if codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise ValueError(f"codes must be an integer tensor, got {codes.dtype}")
    length, cols = codes.shape
    codes = codes.to(torch.int64)
    if length and (int(codes.min()) < 0 or int(codes.max()) >= 2**bits):
        raise ValueError(
            f"codes must lie in [0, {2**bits - 1}] for {bits}-bit packing, "
            f"got range [{int(codes.min())}, {int(codes.max())}]"
        )
    units = -(-length // CODES_PER_UNIT)
    padded = codes.new_zeros(units * CODES_PER_UNIT, cols)
    padded[:length] = codes
    padded = padded.view(units, CODES_PER_UNIT, cols)
    words = codes.new_zeros(units, bits, cols)
    for t in range(CODES_PER_UNIT):
        offset = t * bits
        word, shift = divmod(offset, 32)
        words[:, word] |= (padded[:, t] << shift) & 0xFFFFFFFF
        if shift + bits > 32:  # the code straddles into the next word (3-bit only)
            words[:, word + 1] |= padded[:, t] >> (32 - shift)
    return _to_int32(words.view(units * bits, cols))


def unpack_rows(packed: torch.Tensor, bits: int, length: int) -> torch.Tensor:
    """Inverse of :func:`pack_rows`.

    Args:
        packed: int32 tensor ``[packed_length(length, bits), C]``.
        bits: 2, 3 or 4.
        length: number of codes to return along dim 0 (drops the padding).
    Returns:
        int32 tensor ``[length, C]`` with values in ``[0, 2**bits)``.
    """
    _check_bits(bits)
    if packed.dim() != 2 or packed.dtype != torch.int32:
        raise ValueError(
            f"packed must be a 2-D int32 tensor, got {packed.dtype} {tuple(packed.shape)}"
        )
    if packed.shape[0] != packed_length(length, bits):
        raise ValueError(
            f"{length} codes of {bits} bits need {packed_length(length, bits)} packed rows, "
            f"got {packed.shape[0]}"
        )
    units = packed.shape[0] // bits
    cols = packed.shape[1]
    words = packed.to(torch.int64) & 0xFFFFFFFF
    words = words.view(units, bits, cols)
    mask = (1 << bits) - 1
    codes = packed.new_zeros(units, CODES_PER_UNIT, cols, dtype=torch.int64)
    for t in range(CODES_PER_UNIT):
        offset = t * bits
        word, shift = divmod(offset, 32)
        value = words[:, word] >> shift
        if shift + bits > 32:
            value = value | (words[:, word + 1] << (32 - shift))
        codes[:, t] = value & mask
    return codes.view(units * CODES_PER_UNIT, cols)[:length].to(torch.int32)


def pack_qweight(codes_kn: torch.Tensor, bits: int) -> torch.Tensor:
    """Weight codes ``[K, N]`` -> GPTQ ``qweight`` int32 ``[K*bits/32, N]`` (packed along K)."""
    return pack_rows(codes_kn, bits)


def unpack_qweight(qweight: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """GPTQ ``qweight`` int32 ``[K*bits/32, N]`` -> codes int32 ``[K, N]``."""
    return unpack_rows(qweight, bits, in_features)


def pack_qzeros(zeros_gn: torch.Tensor, bits: int) -> torch.Tensor:
    """Zero points ``[n_groups, N]`` -> GPTQ ``qzeros`` int32 ``[n_groups, N*bits/32]`` (along N)."""
    return pack_rows(zeros_gn.t(), bits).t().contiguous()


def unpack_qzeros(qzeros: torch.Tensor, bits: int, out_features: int) -> torch.Tensor:
    """GPTQ ``qzeros`` int32 ``[n_groups, N*bits/32]`` -> zero points int32 ``[n_groups, N]``."""
    return unpack_rows(qzeros.t().contiguous(), bits, out_features).t().contiguous()


def default_g_idx(in_features: int, group_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Group index of each input channel for contiguous groups.

    ``group_size == -1`` means one group over all of K.  When ``group_size`` does not divide
    K the last group is partial (K=576 with g128 gives groups of 128,128,128,128,64).

    Returns:
        int32 tensor ``[K]`` on ``device``.
    """
    if group_size == -1:
        return torch.zeros(in_features, dtype=torch.int32, device=device)
    if group_size <= 0:
        raise ValueError(f"group_size must be -1 or positive, got {group_size}")
    return torch.arange(in_features, dtype=torch.int32, device=device) // group_size


def num_groups(in_features: int, group_size: int) -> int:
    """Number of quantization groups along K (the last one may be partial)."""
    return 1 if group_size == -1 else -(-in_features // group_size)
