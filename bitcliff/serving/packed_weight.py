"""The weight of one served linear layer, built once from its packed GPTQ tensors, and its matmul.

A rank's tensors (after the engine's tensor-parallel slicing, see :mod:`bitcliff.serving.sharding`)
become bitcliff kernel layouts: on the CPU the compiled kernel's packed form
(:func:`bitcliff.kernels.cpu.from_kernel_layout`), on CUDA the Triton kernels' layout
(:func:`bitcliff.kernels.ops.run`).  No dense floating copy of the weight is kept.

A fused layer (q/k/v, gate/up) whose shards share one ``g_idx`` is one layout over the
concatenated output features, which is exact.  Shards with their own ``g_idx`` (act-order with
per-projection orders), or stored at different widths or group sizes (:func:`build_shards`), get
one layout each, their outputs concatenated; a shard left in full precision (a restored 4-bit
module) keeps its dense weight, which is what it is stored as.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from bitcliff.kernels import cpu, ops
from bitcliff.kernels.layout import KernelLayout, from_gptq
from bitcliff.kernels.pack import pack_qzeros, unpack_qzeros
from bitcliff.quant.checkpoint import v1_to_v2_qzeros
from bitcliff.serving.sharding import compact_groups


@dataclass(frozen=True)
class PackedWeight:
    """A served layer's weight: one kernel layout per output piece.

    Attributes:
        layouts: CPU layouts (``bitcliff.kernels.cpu``) or CUDA :class:`KernelLayout` s, one per
            piece; a full-precision piece's dense weight ``[N_s, K]``.
        out_features: N of each piece, in output order.
    """

    layouts: tuple
    out_features: tuple[int, ...]

    @property
    def total_out(self) -> int:
        return sum(self.out_features)


def _layout(qweight, zeros, scales, g_idx, bits: int, device: torch.device):
    """One piece's layout: its groups compacted, repacked, in the device's form."""
    g, s, z = compact_groups(g_idx, scales, zeros)
    layout = from_gptq(qweight.cpu(), pack_qzeros(z, bits), s, g, bits)
    if device.type == "cpu":
        return cpu.from_kernel_layout(layout)
    return layout.to(device)


def build(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    shard_sizes: Sequence[int],
    zeros_minus_one: bool,
) -> PackedWeight:
    """Build a served layer's weight from one rank's GPTQ tensors.

    Args:
        qweight: int32 ``[K*bits/32, N]`` (this rank's K and N).
        qzeros: int32 ``[G, N*bits/32]``.
        scales: ``[G, N]``; fp16 keeps the compiled CPU kernel (checkpoints store fp16).
        g_idx: int32 ``[S, K]``: each fused shard's group index per input column (``S = 1``
            unfused); values are global group indices into ``scales``.
        bits: 2, 3 or 4.
        shard_sizes: this rank's N of each shard, ``sum == N``.
        zeros_minus_one: ``checkpoint_format="gptq"`` (v1), whose ``qzeros`` hold ``zero - 1``.
    Returns:
        The :class:`PackedWeight`, on ``qweight``'s device.
    """
    n = qweight.shape[1]
    if sum(shard_sizes) != n or g_idx.dim() != 2 or g_idx.shape[0] != len(shard_sizes):
        raise ValueError(f"shard sizes {list(shard_sizes)} and g_idx {tuple(g_idx.shape)} do not fit qweight "
                         f"{tuple(qweight.shape)}")
    device = qweight.device
    qzeros = qzeros.cpu()
    if zeros_minus_one:
        qzeros = v1_to_v2_qzeros(qzeros, bits, n)
    zeros = unpack_qzeros(qzeros, bits, n)
    g_idx = g_idx.cpu()
    if all(torch.equal(g_idx[0], row) for row in g_idx[1:]):
        return PackedWeight((_layout(qweight, zeros, scales.cpu(), g_idx[0], bits, device),), (n,))
    layouts, start = [], 0
    for row, size in zip(g_idx, shard_sizes):
        cols = slice(start, start + size)
        layouts.append(_layout(qweight[:, cols], zeros[:, cols], scales.cpu()[:, cols], row, bits, device))
        start += size
    return PackedWeight(tuple(layouts), tuple(shard_sizes))


def build_shards(shards: Sequence[tuple | torch.Tensor], device: torch.device) -> PackedWeight:
    """A fused layer's weight from shards stored at different widths or group sizes, one layout each.

    Args:
        shards: per shard, in output order, ``(qweight, zeros, scales, g_idx, bits)``: int32
            ``[K*bits/32, N_s]``, true zero points int32 ``[G_s, N_s]`` (unpacked), ``[G_s, N_s]``
            scales, int32 ``[K]`` global group indices, and the width; or, for a shard in full
            precision, its weight ``[N_s, K]`` in the model's dtype.
        device: where the layouts go.
    """
    layouts, out_features = [], []
    for shard in shards:
        if isinstance(shard, torch.Tensor):
            layouts.append(shard.to(device))
            out_features.append(shard.shape[0])
        else:
            qweight, zeros, scales, g_idx, bits = shard
            layouts.append(_layout(qweight, zeros, scales.cpu(), g_idx.cpu(), bits, device))
            out_features.append(qweight.shape[1])
    return PackedWeight(tuple(layouts), tuple(out_features))


def _run_one(x: torch.Tensor, layout, bias: torch.Tensor | None) -> torch.Tensor:
    if isinstance(layout, torch.Tensor):  # a shard in full precision
        return torch.nn.functional.linear(x, layout.to(x.dtype), bias)
    if isinstance(layout, KernelLayout):  # CUDA: the Triton operators
        return ops.run(x, layout, bias)
    return cpu.matmul(x, layout, bias)


def matmul(x: torch.Tensor, weight: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``y = x @ dequant(W)ᵀ (+ bias)``: ``x`` ``[..., K]`` to ``[..., N]`` in ``x.dtype``."""
    if len(weight.layouts) == 1:
        return _run_one(x, weight.layouts[0], bias)
    y = torch.cat([_run_one(x, layout, None) for layout in weight.layouts], dim=-1)
    return y if bias is None else y + bias.to(y.dtype)
