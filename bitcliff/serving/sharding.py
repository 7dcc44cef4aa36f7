"""Tensor-parallel bookkeeping of packed GPTQ tensors, engine-independent.

How a served layer's tensors are split across ranks (the engine does the slicing; these are the
rules it must be given, and what a rank does with its slice):

* **column-parallel** (output features split): ``qweight`` ``[K*b/32, N]``, ``scales`` ``[G, N]``
  and ``qzeros`` ``[G, N*b/32]`` are sliced along N; ``g_idx`` ``[K]`` is whole on every rank.
  ``qzeros`` packs along N, so each rank's (and each fused shard's) N must fill whole words:
  ``N * b % 32 == 0`` (a multiple of 32 columns at 3 bits, whose codes straddle words).
* **row-parallel** (input features split): ``qweight`` packs along K and ``g_idx`` is sliced
  along K, so each rank's K must fill whole words too; ``scales`` and ``qzeros`` are given whole
  to every rank, because with act-order a rank's columns may belong to any group.  Each rank then
  keeps only the groups its columns use (:func:`compact_groups`), so its kernel runs over its own
  groups and no more.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

WORD_BITS = 32


def check_packable(sizes: Sequence[int], bits: int, what: str) -> None:
    """Refuse a split whose pieces do not fill whole int32 words of ``bits``-bit codes.

    Args:
        sizes: the length of each piece along the packed dimension (per rank, per fused shard).
        bits: code width.
        what: the layer and dimension, for the message.
    Raises:
        ValueError: naming the first piece that straddles a word.
    """
    for size in sizes:
        if size * bits % WORD_BITS:
            need = WORD_BITS // math.gcd(bits, WORD_BITS)
            raise ValueError(
                f"{what}: a piece of {size} {bits}-bit codes does not fill whole int32 words (pieces must be "
                f"multiples of {need}); use a tensor-parallel size that splits it into such pieces"
            )


def compact_groups(
    g_idx: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep only the groups that ``g_idx`` uses, renumbered in order (exact).

    Args:
        g_idx: int ``[K]``, global group index of each of this rank's input columns.
        scales: ``[G, N]`` (any float dtype).
        zeros: int ``[G, N]``, unpacked zero points.
    Returns:
        ``(g_idx, scales, zeros)``: int32 ``[K]`` with values in ``[0, G')``, ``[G', N]``, ``[G', N]``,
        where ``G'`` is the number of distinct groups used.
    """
    g = g_idx.to(torch.int64)
    used = torch.unique(g)  # sorted
    if used.numel() and (int(used[0]) < 0 or int(used[-1]) >= scales.shape[0]):
        raise ValueError(f"g_idx holds groups outside [0, {scales.shape[0]})")
    local = torch.searchsorted(used, g).to(torch.int32)
    return local, scales[used], zeros[used]


def split_sizes(total: int, parts: int) -> list[int]:
    """Equal pieces of ``total`` for ``parts`` ranks (the engine's even split)."""
    if total % parts:
        raise ValueError(f"{total} does not split evenly over {parts} ranks")
    return [total // parts] * parts
