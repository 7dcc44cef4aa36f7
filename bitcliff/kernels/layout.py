"""The in-memory weight layout of the Triton kernels, and its exact conversion to and from GPTQ.

The GPTQ checkpoint layout (``pack.py``) is a bit stream along K: fine for 2 and 4 bits, but
3-bit codes straddle int32 words, which costs a kernel two loads and a funnel shift per code.
The kernel layout removes that and everything else a kernel would otherwise redo per call:

* **bit planes along K.**  Codes are stored in *planes* of 1, 2 or 4 bits that never straddle:
  plane word ``[r, n]`` holds codes ``k = r*PER .. r*PER+PER-1`` of column ``n`` (``PER = 32 /
  plane bits``).  4-bit and 2-bit weights have one plane; 3-bit weights have a 2-bit plane ``lo``
  (bits 0-1 of every code) and a 1-bit plane ``hi`` (bit 2).  Both are exactly 3 bits per weight.
* **even codes in the low half-word, odd codes in the high one.**  Code ``i`` of a word sits at
  bit ``16 * (i % 2) + width * (i // 2)``: the two codes of a pair ``(2m, 2m+1)`` share a field
  position in the two halves, so the GPU decodes them with one instruction into one ``half2``
  that multiplies activations ``(x[2m], x[2m+1])`` as they lie in memory (``decode.py``).  (The
  GPTQ ``qweight`` stores codes in order, ``i`` at bit ``width * i``.)
* **zeros unpacked** to ``uint8 [n_groups, N]``: one byte per group and column instead of a
  bit-packed row along N that each kernel tile would have to unpack (fewer bytes than an fp16
  zero, and exact: the kernel forms ``code - zero`` in fp32).
* **groups contiguous and 32-aligned along the kernel's K.**  Act-order checkpoints (a ``g_idx``
  that is not ``k // group_size``) are reordered once: the kernel's K position ``p`` reads
  activation column ``kidx[p]``, and positions are sorted by group.  When the sorted groups are
  not all one size that is a multiple of 32 (a random ``g_idx``, or ``group_size=48``), each
  group gets a slot of ``P`` positions (``P`` the largest group rounded up to 32) and the unused
  slots are padding (``kidx = -1``: the kernel reads a zero activation there).  Either way the
  kernel sees plain contiguous groups of a compile-time size, so it has no per-channel gather of
  scales.  ``to_gptq`` inverts all of this exactly (tested both ways).

K is padded with zero codes to a multiple of 32 (``k_padded``); the kernel masks the padding
by ``k < in_features`` (or ``kidx = -1``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from bitcliff.kernels.pack import (
    SUPPORTED_BITS,
    pack_qweight,
    pack_qzeros,
    unpack_qweight,
    unpack_qzeros,
)

UNIT = 32  # codes per packing unit; k_padded and group sizes are multiples of it
#: The layout is built and unpacked on the host, once per layer, then moved to the weight's device;
#: the index tensors are made there explicitly, whatever ``torch.set_default_device`` says.
HOST = torch.device("cpu")


@dataclass(frozen=True)
class Width:
    """How ``bits``-bit codes live in the kernel layout, derived from the width alone.

    A code is split into bit *planes* of power-of-two widths (so that no plane word ever straddles),
    the widest first, holding the code's low bits: 4 -> ``(4,)``, 3 -> ``(2, 1)``.  The kernels take
    ``lo`` and ``hi`` as compile-time constants; nothing in them branches on the width itself.
    """

    bits: int
    planes: tuple[int, ...]

    @property
    def lo(self) -> int:
        """Bits of the low plane (the code's low bits)."""
        return self.planes[0]

    @property
    def hi(self) -> int:
        """Bits of the high plane (0: none); the kernels decode at most two planes."""
        return self.planes[1] if len(self.planes) > 1 else 0

    @property
    def codes_per_word(self) -> int:
        """Codes in one low-plane word."""
        return 32 // self.lo


def _planes(bits: int) -> tuple[int, ...]:
    """``bits`` as a sum of powers of two, widest first (its binary digits)."""
    return tuple(1 << i for i in reversed(range(bits.bit_length())) if bits >> i & 1)


def width(bits: int) -> Width:
    """The :class:`Width` of ``bits``-bit codes; ``ValueError`` naming the supported widths."""
    if isinstance(bits, bool) or bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")
    spec = Width(bits, _planes(bits))
    if len(spec.planes) > 2:
        raise ValueError(f"{bits}-bit codes need {len(spec.planes)} bit planes; the kernels decode at most two")
    return spec


def plane_bits(bits: int) -> tuple[int, ...]:
    """Widths of the bit planes a ``bits``-bit code is split into (low plane first)."""
    return width(bits).planes


def code_bit(position: torch.Tensor | int, width: int):
    """Bit offset of the code at ``position`` (0..PER-1) within its plane word: even codes in the
    low half-word, odd codes in the high half-word, each half filled from bit 0 up."""
    return 16 * (position % 2) + width * (position // 2)


def pack_plane(codes: torch.Tensor, width: int) -> torch.Tensor:
    """Pack ``[L, C]`` codes of ``width`` bits (L a multiple of 32) along dim 0 into int32 words."""
    per = 32 // width
    length, cols = codes.shape
    if length % per:
        raise ValueError(f"plane length {length} is not a multiple of {per} codes")
    c = codes.to(torch.int64).view(length // per, per, cols)
    shifts = code_bit(torch.arange(per, dtype=torch.int64, device=HOST), width).view(1, per, 1)
    words = (c << shifts).sum(dim=1)  # disjoint bit fields: the sum is their OR
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_plane(words: torch.Tensor, width: int) -> torch.Tensor:
    """Inverse of :func:`pack_plane`: int32 ``[L/PER, C]`` -> int64 codes ``[L, C]``."""
    per = 32 // width
    rows, cols = words.shape
    w = (words.to(torch.int64) & 0xFFFFFFFF).view(rows, 1, cols)
    shifts = code_bit(torch.arange(per, dtype=torch.int64, device=HOST), width).view(1, per, 1)
    return ((w >> shifts) & ((1 << width) - 1)).view(rows * per, cols)


@dataclass(frozen=True)
class KernelLayout:
    """One linear layer's weight as the Triton kernels read it.

    Attributes:
        bits: code width, 2, 3 or 4.
        in_features: K, the activation width.
        out_features: N.
        group_size: group size along the kernel's K order: ``-1`` (one group) or a multiple of 32.
        lo: int32 ``[k_padded * lo_bits / 32, N]``, the low plane (the only one for 2/4 bits).
        hi: int32 ``[k_padded * hi_bits / 32, N]``, the high plane (bit 2 of each 3-bit code);
            ``None`` for widths with one plane (:func:`width`).
        scales: ``[n_groups, N]`` (fp16 as stored in the checkpoint).
        zeros: uint8 ``[n_groups, N]``, the true (v2) zero points.
        kidx: int32 ``[k_padded]``, the activation column read at each kernel K position
            (``-1`` for padding), or ``None`` when that is the identity.
    """

    bits: int
    in_features: int
    out_features: int
    group_size: int
    lo: torch.Tensor
    hi: torch.Tensor | None
    scales: torch.Tensor
    zeros: torch.Tensor
    kidx: torch.Tensor | None

    @property
    def k_padded(self) -> int:
        return self.lo.shape[0] * width(self.bits).codes_per_word

    @property
    def n_groups(self) -> int:
        return self.scales.shape[0]

    @property
    def device(self) -> torch.device:
        return self.lo.device

    def to(self, device: torch.device | str) -> "KernelLayout":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return replace(
            self, lo=move(self.lo), hi=move(self.hi), scales=move(self.scales),
            zeros=move(self.zeros), kidx=move(self.kidx),
        )

    def nbytes(self) -> int:
        """Bytes a kernel reads for the weight (planes, scales, zeros, kidx)."""
        tensors = (self.lo, self.hi, self.scales, self.zeros, self.kidx)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def codes(self) -> torch.Tensor:
        """Codes in kernel K order, int64 ``[k_padded, N]`` (padding positions hold 0)."""
        spec = width(self.bits)
        codes = unpack_plane(self.lo.cpu(), spec.lo)
        if self.hi is not None:
            codes = codes | (unpack_plane(self.hi.cpu(), spec.hi) << spec.lo)
        return codes

    def source_columns(self) -> torch.Tensor:
        """int64 ``[k_padded]``: activation column of each kernel K position, -1 for padding."""
        if self.kidx is not None:
            return self.kidx.cpu().to(torch.int64)
        p = torch.arange(self.k_padded, dtype=torch.int64, device=HOST)
        return torch.where(p < self.in_features, p, torch.full_like(p, -1))

    def position_groups(self) -> torch.Tensor:
        """int64 ``[k_padded]``: group of each kernel K position."""
        p = torch.arange(self.k_padded, dtype=torch.int64, device=HOST)
        if self.group_size == -1:
            return torch.zeros_like(p)
        return torch.clamp(p // self.group_size, max=self.n_groups - 1)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dense ``[N, K]`` weight in the original column order (exact in float32)."""
        src = self.source_columns()
        valid = src >= 0
        g = self.position_groups()[valid]
        scales, zeros = self.scales.cpu().float(), self.zeros.cpu().float()
        w_pk = scales[g] * (self.codes()[valid].float() - zeros[g])  # [K, N] in kernel order
        weight = torch.empty(self.in_features, self.out_features, dtype=torch.float32, device=HOST)
        weight[src[valid]] = w_pk
        return weight.t().to(device=self.device, dtype=dtype)


def _kernel_order(g_idx: torch.Tensor, n_groups: int) -> tuple[int, torch.Tensor | None, int]:
    """Decide the kernel K order for a ``g_idx``.

    Returns ``(group_size, kidx, k_padded)``: ``kidx`` (int64 or ``None`` for the identity)
    maps kernel positions to activation columns, -1 for padding.
    """
    k = g_idx.numel()
    g = g_idx.to(torch.int64)
    k_padded = -(-k // UNIT) * UNIT
    if n_groups == 1 or bool((g == g[0]).all()) and int(g[0]) == 0:
        return -1, None, k_padded
    order = torch.argsort(g, stable=True)
    sorted_g = g[order]
    first = int((sorted_g == 0).sum())
    if first > 0 and first % UNIT == 0 and torch.equal(sorted_g, torch.arange(k, device=HOST) // first):
        identity = torch.equal(order, torch.arange(k, device=HOST))
        if identity:
            return first, None, k_padded
        pad = torch.full((k_padded - k,), -1, dtype=torch.int64, device=HOST)
        return first, torch.cat([order, pad]), k_padded
    # Uneven or unaligned groups: one slot of `slot` positions per group id, padding unused.
    counts = torch.bincount(g, minlength=n_groups)
    slot = max(UNIT, -(-int(counts.max()) // UNIT) * UNIT)
    starts = torch.cumsum(counts, 0) - counts  # first sorted index of each group
    rank = torch.arange(k, device=HOST) - starts[sorted_g]
    kidx = torch.full((n_groups * slot,), -1, dtype=torch.int64, device=HOST)
    kidx[sorted_g * slot + rank] = order
    return slot, kidx, n_groups * slot


def from_gptq(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
) -> KernelLayout:
    """Repack GPTQ tensors (see ``reference.dequantize`` for their shapes) into a :class:`KernelLayout`.

    Exact: :func:`to_gptq` gives back the same codes, zeros, scales and ``g_idx``.  Runs once per
    layer at load (on CPU); the result is moved to the weight's device.
    """
    device = qweight.device
    in_features = g_idx.numel()
    n_groups, out_features = scales.shape
    g = g_idx.cpu().to(torch.int64)
    if in_features == 0 or int(g.min()) < 0 or int(g.max()) >= n_groups:
        raise ValueError(f"g_idx must hold group indices in [0, {n_groups}) for {in_features} columns")
    codes = unpack_qweight(qweight.cpu(), bits, in_features).to(torch.int64)  # [K, N]
    zeros = unpack_qzeros(qzeros.cpu(), bits, out_features)
    group_size, kidx, k_padded = _kernel_order(g, n_groups)
    kcodes = torch.zeros(k_padded, out_features, dtype=torch.int64, device=HOST)
    if kidx is None:
        kcodes[:in_features] = codes
    else:
        valid = kidx >= 0
        kcodes[valid] = codes[kidx[valid]]
    spec = width(bits)
    lo = pack_plane(kcodes & ((1 << spec.lo) - 1), spec.lo)
    hi = pack_plane(kcodes >> spec.lo, spec.hi) if spec.hi else None
    layout = KernelLayout(
        bits=bits,
        in_features=in_features,
        out_features=out_features,
        group_size=group_size,
        lo=lo,
        hi=hi,
        scales=scales.detach().cpu().contiguous(),
        zeros=zeros.to(torch.uint8).contiguous(),
        kidx=None if kidx is None else kidx.to(torch.int32),
    )
    return layout.to(device)


def to_gptq(layout: KernelLayout) -> dict[str, torch.Tensor]:
    """Exact inverse of :func:`from_gptq`: ``qweight``, ``qzeros`` (v2), ``scales``, ``g_idx`` (on CPU)."""
    src = layout.source_columns()
    valid = src >= 0
    codes = torch.zeros(layout.in_features, layout.out_features, dtype=torch.int64, device=HOST)
    codes[src[valid]] = layout.codes()[valid]
    g_idx = torch.zeros(layout.in_features, dtype=torch.int32, device=HOST)
    g_idx[src[valid]] = layout.position_groups()[valid].to(torch.int32)
    return {
        "qweight": pack_qweight(codes, layout.bits),
        "qzeros": pack_qzeros(layout.zeros.cpu().to(torch.int64), layout.bits),
        "scales": layout.scales.cpu().clone(),
        "g_idx": g_idx,
    }
