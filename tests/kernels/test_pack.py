"""Packing: exact round trips (property-based) and known answers for the GPTQ layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bitcliff.kernels.pack import (
    default_g_idx,
    num_groups,
    pack_qweight,
    pack_qzeros,
    packed_length,
    unpack_qweight,
    unpack_qzeros,
)


def classic_gptq_pack_3bit(codes: np.ndarray) -> np.ndarray:
    """The original GPTQ 3-bit packing loop (32 codes in 3 words), written independently."""
    codes = codes.astype(np.uint64)
    k, n = codes.shape
    out = np.zeros((k // 32 * 3, n), dtype=np.uint64)
    i = row = 0
    while row < out.shape[0]:
        for j in range(10):
            out[row] |= codes[i + j] << np.uint64(3 * j)
        i += 10
        out[row] |= (codes[i] << np.uint64(30)) & np.uint64(0xFFFFFFFF)
        row += 1
        out[row] |= (codes[i] >> np.uint64(2)) & np.uint64(1)
        i += 1
        for j in range(10):
            out[row] |= codes[i + j] << np.uint64(3 * j + 1)
        i += 10
        out[row] |= (codes[i] << np.uint64(31)) & np.uint64(0xFFFFFFFF)
        row += 1
        out[row] |= (codes[i] >> np.uint64(1)) & np.uint64(3)
        i += 1
        for j in range(10):
            out[row] |= codes[i + j] << np.uint64(3 * j + 2)
        i += 10
        row += 1
    return out.astype(np.uint32).view(np.int32)


def nibble_pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """2/4-bit GPTQ packing: word w holds codes w*per .. w*per+per-1, LSB first."""
    per = 32 // bits
    k, n = codes.shape
    out = np.zeros((k // per, n), dtype=np.uint64)
    for j in range(per):
        out |= codes[j::per].astype(np.uint64) << np.uint64(bits * j)
    return out.astype(np.uint32).view(np.int32)


@pytest.mark.parametrize("bits", [2, 4])
def test_known_answer_2_4_bit(bits):
    codes = torch.randint(0, 2**bits, (96, 7))
    assert np.array_equal(pack_qweight(codes, bits).numpy(), nibble_pack(codes.numpy(), bits))


def test_known_answer_3_bit_straddles_words():
    codes = torch.randint(0, 8, (64, 5))
    assert np.array_equal(pack_qweight(codes, 3).numpy(), classic_gptq_pack_3bit(codes.numpy()))
    # code 10 of a unit straddles words 0/1: its high bit is bit 0 of word 1
    one = torch.zeros(32, 1, dtype=torch.int32)
    one[10] = 0b100
    packed = pack_qweight(one, 3)
    assert packed[0, 0] == 0 and packed[1, 0] == 1 and packed[2, 0] == 0


@settings(max_examples=60, deadline=None)
@given(
    bits=st.sampled_from([2, 3, 4]),
    length=st.integers(min_value=1, max_value=200),
    cols=st.integers(min_value=1, max_value=9),
    seed=st.integers(min_value=0, max_value=2**31 - 1),
)
def test_round_trip_any_shape(bits, length, cols, seed):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (length, cols), generator=gen, dtype=torch.int32)
    qweight = pack_qweight(codes, bits)
    assert qweight.dtype == torch.int32 and qweight.shape == (packed_length(length, bits), cols)
    assert torch.equal(unpack_qweight(qweight, bits, length), codes)
    zeros = codes.t().contiguous()  # [groups, N] packs along N
    qzeros = pack_qzeros(zeros, bits)
    assert qzeros.shape == (cols, packed_length(length, bits))
    assert torch.equal(unpack_qzeros(qzeros, bits, length), zeros)


def test_extreme_codes_use_the_sign_bit():
    for bits in (2, 3, 4):
        codes = torch.full((32, 3), 2**bits - 1, dtype=torch.int32)
        packed = pack_qweight(codes, bits)
        assert (packed == -1).all()  # every bit set, including bit 31
        assert torch.equal(unpack_qweight(packed, bits, 32), codes)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="bits must be one of"):
        pack_qweight(torch.zeros(32, 2, dtype=torch.int32), 5)
    with pytest.raises(ValueError, match=r"\[0, 7\]"):
        pack_qweight(torch.full((32, 2), 8, dtype=torch.int32), 3)
    with pytest.raises(ValueError, match="integer"):
        pack_qweight(torch.zeros(32, 2), 4)
    with pytest.raises(ValueError, match="packed rows"):
        unpack_qweight(torch.zeros(5, 2, dtype=torch.int32), 4, 64)


def test_groups_partial_and_per_channel():
    g = default_g_idx(576, 128)
    assert num_groups(576, 128) == 5
    assert g[-1] == 4 and (g == 4).sum() == 64
    assert (default_g_idx(576, -1) == 0).all() and num_groups(576, -1) == 1
    with pytest.raises(ValueError, match="group_size"):
        default_g_idx(576, 0)
