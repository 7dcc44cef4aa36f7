"""Quantized low-rank factors: the rounding against a plain reference, the least-squares refit,
the stored bits against the bytes written, and refusal of files that do not fit."""

from __future__ import annotations

import pytest
import torch

from bitcliff.quant.factors import (
    FACTOR_GROUP,
    QuantizedFactors,
    factor_matrix_bits,
    least_squares_b,
    quantize_factors,
)


def _reference_round(matrix: torch.Tensor, bits: int) -> torch.Tensor:
    """Round each row's groups of FACTOR_GROUP columns to an asymmetric min-max grid, loop by loop."""
    out = torch.empty_like(matrix)
    maxq = 2**bits - 1
    for row in range(matrix.shape[0]):
        for start in range(0, matrix.shape[1], FACTOR_GROUP):
            group = matrix[row, start:start + FACTOR_GROUP]
            low, high = min(float(group.min()), 0.0), max(float(group.max()), 0.0)
            scale = float(torch.tensor((high - low) / maxq).half())
            zero = min(max(round(-low / scale), 0), maxq)
            codes = torch.clamp(torch.round(group / scale) + zero, 0, maxq)
            out[row, start:start + FACTOR_GROUP] = scale * (codes - zero)
    return out


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("rank,k,n", [(4, 96, 80), (7, 200, 33)])  # partial groups and packing units
def test_factors_round_like_the_reference_and_load_back_exactly(bits, rank, k, n):
    g = torch.Generator().manual_seed(bits * 100 + rank)
    a, b = torch.randn(rank, k, generator=g), torch.randn(n, rank, generator=g)
    quantized = quantize_factors(a, b, bits)
    qa, qb = quantized.dequantize()
    assert qa.shape == (rank, k) and qb.shape == (n, rank)
    torch.testing.assert_close(qa, _reference_round(a, bits), rtol=0, atol=1e-6)
    torch.testing.assert_close(qb, _reference_round(b.t().contiguous(), bits).t(), rtol=0, atol=1e-6)
    tensors = quantized.tensors("m")
    on_disk = 8 * sum(t.numel() * t.element_size() for t in tensors.values())
    assert on_disk == quantized.stored_bits() == factor_matrix_bits(rank, k, bits) + factor_matrix_bits(rank, n, bits)
    back = QuantizedFactors.from_tensors(tensors, "m", (n, k))
    assert back.bits == bits and all(torch.equal(x, y) for x, y in zip(back.dequantize(), quantized.dequantize()))


def test_the_refitted_b_is_the_least_squares_optimum_for_the_rounded_a():
    g = torch.Generator().manual_seed(0)
    n, k, r = 24, 64, 3
    error = torch.randn(n, k, generator=g, dtype=torch.float64)
    x = torch.randn(500, k, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3, k, dtype=torch.float64)
    covariance = x.t() @ x / len(x)
    a = torch.randn(r, k, generator=g, dtype=torch.float64)
    b = least_squares_b(error, covariance, a).double()

    def loss(bm):
        d = error - bm @ a
        return float(((d @ covariance) * d).sum())

    # brute force: the same objective as an ordinary least squares in the whitened space
    root = torch.linalg.cholesky(covariance)
    brute = torch.linalg.lstsq((a @ root).t(), (error @ root).t()).solution.t()
    torch.testing.assert_close(b, brute, rtol=1e-4, atol=1e-5)
    for _ in range(5):
        assert loss(b) <= loss(b + 1e-3 * torch.randn(n, r, generator=g, dtype=torch.float64))


def test_refitting_b_lowers_the_output_error_of_rounded_factors():
    g = torch.Generator().manual_seed(1)
    n, k, r = 64, 128, 8
    x = torch.randn(1000, k, generator=g) * torch.linspace(0.2, 2, k)
    covariance = x.t() @ x / len(x)
    a, b = torch.randn(r, k, generator=g), torch.randn(n, r, generator=g)
    error = b @ a + 0.1 * torch.randn(n, k, generator=g)

    def loss(factors):
        qa, qb = factors.dequantize()
        d = (error - qb @ qa).double()
        return float(((d @ covariance.double()) * d).sum())

    assert loss(quantize_factors(a, b, 3, error, covariance)) < loss(quantize_factors(a, b, 3))


@pytest.mark.parametrize("damage,match", [
    ("rank", "differ in width or rank"),
    ("columns", "packs no 2-4 bit codes"),
    ("scales", "needs scales and zeros of shape"),
    ("zeros", "zero points beyond 3 bits"),
])
def test_factors_that_do_not_fit_their_module_are_refused(damage, match):
    g = torch.Generator().manual_seed(2)
    tensors = quantize_factors(torch.randn(4, 128, generator=g), torch.randn(64, 4, generator=g), 3).tensors("m")
    if damage == "rank":
        tensors["m.lora_B.qweight"] = tensors["m.lora_B.qweight"][:, :3]
        tensors["m.lora_B.scales"] = tensors["m.lora_B.scales"][:, :3]
        tensors["m.lora_B.zeros"] = tensors["m.lora_B.zeros"][:, :3]
    elif damage == "columns":
        tensors["m.lora_A.qweight"] = tensors["m.lora_A.qweight"][:-1]
    elif damage == "scales":
        tensors["m.lora_A.scales"] = tensors["m.lora_A.scales"][:1]
    else:
        tensors["m.lora_A.zeros"] = tensors["m.lora_A.zeros"] + 8
    with pytest.raises(ValueError, match=match):
        QuantizedFactors.from_tensors(tensors, "m", (64, 128))
