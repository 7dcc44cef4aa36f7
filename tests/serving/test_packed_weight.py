"""A served layer's packed weight, whole and split over tensor-parallel ranks (no engine needed).

The slicing below is what vLLM's packed parameters do with the rules the plugin declares
(``bitcliff.serving.sharding``): a packed dimension is sliced at ``offset // (32 / bits)`` words.
"""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch

from bitcliff.kernels.cpu import exact_activations
from bitcliff.kernels.cpu_packed import INT_MAX_ROWS
from bitcliff.kernels.pack import pack_qweight, pack_qzeros
from bitcliff.serving.packed_weight import build, build_shards, matmul
from bitcliff.serving.sharding import check_packable, compact_groups


#: Rows per product: more than the integer decode takes.
ROWS = INT_MAX_ROWS + 1


@pytest.fixture(autouse=True)
def _fp32_activations():
    """Every product here with fp32 activations, so that a layer equals its dense weight up to
    summation order (the kernel's rounding of the activations is tested against its own reference
    in tests/kernels/test_cpu.py)."""
    with exact_activations():
        yield


def random_layer(k, sizes, bits, group_size, act_order, seed=0):
    """Codes, zeros, scales and per-shard g_idx of a fused layer with shards of ``sizes`` outputs."""
    gen = torch.Generator().manual_seed(seed)
    n, groups = sum(sizes), -(-k // group_size)
    codes = torch.randint(0, 2**bits, (k, n), generator=gen)
    zeros = torch.randint(0, 2**bits, (groups, n), generator=gen)
    scales = (torch.rand(groups, n, generator=gen) * 0.02 + 0.001).half()
    rows = []
    for _ in sizes:
        g = torch.arange(k) // group_size
        rows.append(g[torch.randperm(k, generator=gen)] if act_order else g)
    return codes, zeros, scales, torch.stack(rows).to(torch.int32)


def dense(codes, zeros, scales, g_idx, sizes):
    """fp32 ``[N, K]``: each shard's columns dequantized with its own g_idx."""
    pieces, start = [], 0
    for row, size in zip(g_idx.long(), sizes):
        cols = slice(start, start + size)
        pieces.append(scales.float()[row][:, cols] * (codes[:, cols] - zeros[row][:, cols]).float())
        start += size
    return torch.cat(pieces, dim=1).t()


def words(offset, size, bits):
    """The packed-word slice of codes ``[offset, offset + size)``, as vLLM computes it."""
    factor = Fraction(32, bits)
    return slice(round(offset // factor), round(offset // factor) + round(size // factor))


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("act_order", [False, True])
def test_whole_fused_layer_equals_the_dense_weight(bits, act_order):
    sizes, k = (64, 32, 32), 160  # group 64: a short last group
    codes, zeros, scales, g_idx = random_layer(k, sizes, bits, 64, act_order)
    x = torch.randn(ROWS, k)
    w = build(pack_qweight(codes, bits), pack_qzeros(zeros, bits), scales, g_idx, bits, sizes, False)
    assert len(w.layouts) == (3 if act_order else 1)  # shared g_idx: one layout over the fused N
    y = matmul(x, w, torch.ones(sum(sizes)))
    ref = x @ dense(codes, zeros, scales, g_idx, sizes).t() + 1
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)


def test_shards_at_their_own_widths_and_in_full_precision_equal_their_dense_weights():
    """A fused layer whose q, k and v are stored at 4, 2 and 3 bits, and one with a shard restored
    to full precision: each piece its own layout, the outputs in fused order."""
    k, x = 160, torch.randn(ROWS, 160)
    pieces, refs = [], []
    for i, (bits, group_size, n) in enumerate([(4, 128, 64), (2, 32, 32), (3, 64, 32)]):
        codes, zeros, scales, g_idx = random_layer(k, (n,), bits, group_size, act_order=i == 2, seed=10 + i)
        pieces.append((pack_qweight(codes, bits), zeros.to(torch.int32), scales, g_idx[0], bits))
        refs.append(dense(codes, zeros, scales, g_idx, (n,)))
    restored = torch.randn(48, k)
    for shards, ref, sizes in (
        (pieces, torch.cat(refs), (64, 32, 32)),
        ([pieces[0], restored, pieces[2]], torch.cat([refs[0], restored, refs[2]]), (64, 48, 32)),
    ):
        w = build_shards(shards, torch.device("cpu"))
        assert w.out_features == sizes
        y = matmul(x, w, torch.ones(ref.shape[0]))
        torch.testing.assert_close(y, x @ ref.t() + 1, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bits", [2, 4])
def test_v1_zero_points_are_read_as_zero_minus_one(bits):
    sizes, k = (64,), 128
    codes, zeros, scales, g_idx = random_layer(k, sizes, bits, 32, False)
    zeros = zeros.clamp(min=1)  # v1 cannot hold 0
    x = torch.randn(ROWS, k)
    w = build(pack_qweight(codes, bits), pack_qzeros(zeros - 1, bits), scales, g_idx, bits, sizes, True)
    torch.testing.assert_close(matmul(x, w), x @ dense(codes, zeros, scales, g_idx, sizes).t(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("act_order", [False, True])
def test_column_parallel_ranks_hold_their_output_slice(bits, act_order):
    sizes, k, tp = (64, 64, 128), 128, 2
    codes, zeros, scales, g_idx = random_layer(k, sizes, bits, 32, act_order, seed=1)
    qweight, qzeros = pack_qweight(codes, bits), pack_qzeros(zeros, bits)
    full = dense(codes, zeros, scales, g_idx, sizes)
    x = torch.randn(ROWS, k)
    for rank in range(tp):
        local = [s // tp for s in sizes]
        check_packable(local, bits, "qkv_proj output")
        offsets = [sum(sizes[:i]) + rank * local[i] for i in range(len(sizes))]
        q = torch.cat([qweight[:, o:o + s] for o, s in zip(offsets, local)], dim=1)
        z = torch.cat([qzeros[:, words(o, s, bits)] for o, s in zip(offsets, local)], dim=1)
        s_ = torch.cat([scales[:, o:o + s] for o, s in zip(offsets, local)], dim=1)
        w = build(q, z, s_, g_idx, bits, local, False)
        rows = torch.cat([torch.arange(o, o + s) for o, s in zip(offsets, local)])
        torch.testing.assert_close(matmul(x, w), x @ full[rows].t(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("act_order", [False, True])
def test_row_parallel_partial_sums_add_up_to_the_layer(bits, act_order):
    k, n, tp = 256, 64, 2
    codes, zeros, scales, g_idx = random_layer(k, (n,), bits, 64, act_order, seed=2)
    qweight, qzeros = pack_qweight(codes, bits), pack_qzeros(zeros, bits)
    x = torch.randn(ROWS, k)
    part = k // tp
    check_packable([part], bits, "down_proj input")
    total = torch.zeros(ROWS, n)
    for rank in range(tp):
        q = qweight[words(rank * part, part, bits)]
        g = g_idx[:, rank * part:(rank + 1) * part]  # global group ids; scales and zeros whole
        w = build(q, qzeros, scales, g, bits, (n,), False)
        if not act_order:  # the rank's kernel runs over its own groups only
            assert w.layouts[0].scales.shape[-2] == part // 64
        total += matmul(x[:, rank * part:(rank + 1) * part], w)
    torch.testing.assert_close(total, x @ dense(codes, zeros, scales, g_idx, (n,)).t(), rtol=1e-4, atol=1e-4)


def test_compact_groups_keeps_used_groups_in_order():
    scales = torch.arange(8.0).view(4, 2)
    zeros = torch.arange(8).view(4, 2)
    g, s, z = compact_groups(torch.tensor([3, 1, 3, 1]), scales, zeros)
    assert g.tolist() == [1, 0, 1, 0]
    assert s.tolist() == [[2.0, 3.0], [6.0, 7.0]] and z.tolist() == [[2, 3], [6, 7]]
    with pytest.raises(ValueError, match="outside"):
        compact_groups(torch.tensor([4]), scales, zeros)


def test_pieces_that_straddle_words_are_refused():
    check_packable([32, 64], 3, "x")
    check_packable([8], 4, "x")
    with pytest.raises(ValueError, match="multiples of 32"):
        check_packable([48], 3, "qkv_proj output")
    with pytest.raises(ValueError, match="multiples of 16"):
        check_packable([8], 2, "x")
