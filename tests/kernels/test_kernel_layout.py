"""The kernel layout is an exact, invertible repacking of the GPTQ tensors."""

from __future__ import annotations

import pytest
import torch

from bitcliff.kernels import layout as kl
from bitcliff.kernels import reference
from bitcliff.kernels.pack import (
    default_g_idx,
    num_groups,
    pack_qweight,
    pack_qzeros,
    packed_length,
    unpack_qweight,
)


def gptq_tensors(k, n, bits, group_size, g_idx="contiguous", seed=0):
    gen = torch.Generator().manual_seed(seed)
    groups = num_groups(k, group_size)
    codes = torch.randint(0, 2**bits, (k, n), generator=gen, dtype=torch.int32)
    zeros = torch.randint(0, 2**bits, (groups, n), generator=gen, dtype=torch.int32)
    scales = (torch.rand(groups, n, generator=gen) + 0.5).half()
    gi = default_g_idx(k, group_size)
    if g_idx == "act_order":
        gi = gi[torch.randperm(k, generator=gen)]
    elif g_idx == "random":
        gi = torch.randint(0, groups, (k,), generator=gen, dtype=torch.int32)
    return {"qweight": pack_qweight(codes, bits), "qzeros": pack_qzeros(zeros, bits),
            "scales": scales, "g_idx": gi.to(torch.int32)}


@pytest.mark.parametrize("width", [1, 2, 4])
def test_plane_roundtrip(width):
    codes = torch.randint(0, 2**width, (96, 7))
    words = kl.pack_plane(codes, width)
    assert words.dtype == torch.int32 and words.shape == (96 * width // 32, 7)
    assert torch.equal(kl.unpack_plane(words, width), codes)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("k,n,group_size,g_idx", [
    (96, 40, 32, "contiguous"),
    (576, 24, 128, "contiguous"),  # SmolLM2's K: partial last group of 64
    (100, 33, 64, "contiguous"),  # K and N not multiples of 32
    (70, 5, -1, "contiguous"),  # per-channel
    (200, 16, 48, "contiguous"),  # group not a multiple of 32: padded slots
    (256, 24, 64, "act_order"),
    (160, 24, 32, "random"),  # uneven (possibly empty) groups
])
def test_gptq_roundtrip_is_exact(bits, k, n, group_size, g_idx):
    tensors = gptq_tensors(k, n, bits, group_size, g_idx, seed=bits * 1000 + k)
    layout = kl.from_gptq(**tensors, bits=bits)
    assert layout.k_padded % 32 == 0 and layout.k_padded >= k
    assert layout.group_size == -1 or layout.group_size % 32 == 0
    assert (layout.hi is not None) == (bits == 3)
    back = kl.to_gptq(layout)
    for key in ("qweight", "qzeros", "scales", "g_idx"):
        assert torch.equal(back[key], tensors[key]), key
    dense = reference.dequantize(**tensors, bits=bits)
    assert torch.equal(layout.dequantize(), dense)


@pytest.mark.parametrize("bits", [2, 4])
def test_plane_words_hold_even_codes_low_and_odd_codes_high(bits):
    tensors = gptq_tensors(128, 8, bits, 64)
    layout = kl.from_gptq(**tensors, bits=bits)
    assert layout.kidx is None and layout.group_size == 64
    codes = unpack_qweight(tensors["qweight"], bits, 128).to(torch.int64)
    per = 32 // bits
    word = int(layout.lo[1, 3]) & 0xFFFFFFFF  # codes per .. 2*per-1 of column 3
    for i in range(per):
        half, field = i % 2, i // 2
        assert (word >> (16 * half + bits * field)) & (2**bits - 1) == codes[per + i, 3]


def test_three_bit_planes_hold_low_and_high_bits():
    tensors = gptq_tensors(64, 8, 3, 32)
    codes = unpack_qweight(tensors["qweight"], 3, 64).to(torch.int64)
    layout = kl.from_gptq(**tensors, bits=3)
    assert layout.lo.shape == (packed_length(64, 2), 8) and layout.hi.shape == (2, 8)
    assert torch.equal(kl.unpack_plane(layout.lo, 2), codes & 3)
    assert torch.equal(kl.unpack_plane(layout.hi, 1), codes >> 2)
    assert layout.nbytes() == (4 + 2) * 8 * 4 + 2 * 8 * 2 + 2 * 8  # planes, fp16 scales, u8 zeros


def test_act_order_is_sorted_into_contiguous_groups():
    tensors = gptq_tensors(128, 8, 4, 32, "act_order", seed=3)
    layout = kl.from_gptq(**tensors, bits=4)
    assert layout.group_size == 32 and layout.kidx is not None
    g = tensors["g_idx"].long()
    # Kernel position p reads column kidx[p], which belongs to group p // 32.
    assert torch.equal(g[layout.kidx.long()], torch.arange(128) // 32)
    assert sorted(layout.kidx.tolist()) == list(range(128))


def test_uneven_groups_get_padded_slots():
    tensors = gptq_tensors(96, 8, 4, 32, "random", seed=5)
    layout = kl.from_gptq(**tensors, bits=4)
    counts = torch.bincount(tensors["g_idx"].long(), minlength=3)
    assert layout.group_size >= int(counts.max()) and layout.k_padded == 3 * layout.group_size
    src = layout.source_columns()
    assert sorted(src[src >= 0].tolist()) == list(range(96))
    assert (layout.codes()[src < 0] == 0).all()


def test_rejects_out_of_range_g_idx():
    tensors = gptq_tensors(64, 8, 4, 32)
    tensors["g_idx"] = tensors["g_idx"] + 5
    with pytest.raises(ValueError, match="g_idx"):
        kl.from_gptq(**tensors, bits=4)
