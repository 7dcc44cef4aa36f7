"""Sparse outliers: the CSR storage and GPTQ's extraction inside the solve, against references on
tiny layers."""

from __future__ import annotations

import pytest
import torch

from bitcliff.quant.config import QuantConfig
from bitcliff.quant.gptq import gptq_quantize, proxy_loss
from bitcliff.quant.outliers import SparseOutliers, outlier_budget


def _layer(n: int = 24, k: int = 64, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen)
    w[3, 10] = 9.0  # a weight no 3-bit grid of its group holds well
    x = torch.randn(512, k, generator=gen) * torch.linspace(0.2, 3.0, k)
    return w, 2 * x.t() @ x / x.shape[0]


CONFIG = QuantConfig(bits=3, group_size=32, method="gptq")


def test_csr_round_trips_and_multiplies_like_the_dense_matrix():
    rows = torch.tensor([2, 0, 2, 5])
    cols = torch.tensor([7, 1, 3, 0])
    values = torch.tensor([0.5, -1.25, 2.0, 3.0])
    outliers = SparseOutliers.from_entries(rows, cols, values, (6, 9))
    dense = torch.zeros(6, 9)
    dense[rows, cols] = values
    assert torch.equal(outliers.dense(), dense)
    x = torch.randn(4, 9)
    torch.testing.assert_close(x @ outliers.sparse().to_dense().t(), x @ dense.t())
    assert outliers.crow.tolist() == [0, 1, 1, 3, 3, 3, 4] and outliers.col.dtype == torch.int16
    assert outliers.bits() == 4 * 32 + 7 * 32
    back = SparseOutliers.from_tensors(outliers.tensors("m"), "m", (6, 9))
    assert torch.equal(back.dense(), dense)
    got_rows, got_cols = outliers.coordinates()
    assert torch.equal(dense[got_rows, got_cols], outliers.values.float())
    blocks = outliers.split_rows([3, 1, 2])  # the members of a stacked group
    assert torch.equal(torch.cat([b.dense() for b in blocks]), dense) and [b.nnz for b in blocks] == [3, 0, 1]
    with pytest.raises(ValueError, match="do not add up"):
        outliers.split_rows([3, 2])


@pytest.mark.parametrize("crow,col,message", [
    ([0, 1, 1], [5], "outside"),
    ([0, 2, 1], [1], "crow must rise"),
    ([0, 1], [1], "need crow"),
])
def test_a_sparse_file_that_does_not_fit_its_layer_is_refused(crow, col, message):
    with pytest.raises(ValueError, match=message):
        SparseOutliers(torch.tensor(crow, dtype=torch.int32), torch.tensor(col, dtype=torch.int16),
                       torch.ones(len(col), dtype=torch.float16), (2, 4))


def test_no_outliers_is_plain_gptq_bit_for_bit():
    w, h = _layer()
    plain = gptq_quantize(w, h, CONFIG)
    assert plain.outliers is None
    zero = gptq_quantize(w, h, CONFIG, outliers=0)
    assert torch.equal(zero.qweight.codes, plain.qweight.codes) and torch.equal(zero.qweight.scales, plain.qweight.scales)


@pytest.mark.parametrize("refit", [0, 1])
def test_extracted_weights_are_exact_and_the_output_error_falls(refit):
    w, h = _layer()
    config = QuantConfig(bits=3, group_size=32, method="gptq", refit_rounds=refit)
    plain = gptq_quantize(w, h, config)
    before = proxy_loss(w, plain.qweight.dequantize(), h)
    losses = []
    for budget in (8, 32, 96):
        result = gptq_quantize(w, h, config, outliers=budget)
        sparse = result.outliers
        assert 0 < sparse.nnz <= budget and bool((sparse.values != 0).all())  # no bits for nothing
        effective = result.qweight.dequantize() + sparse.dense()
        kept = sparse.dense() != 0
        torch.testing.assert_close(effective[kept], w[kept], rtol=2e-3, atol=1e-3)  # exact up to fp16
        losses.append(proxy_loss(w, effective, h))
    assert losses[0] < before and losses[0] > losses[1] > losses[2]
    every = gptq_quantize(w, h, config, outliers=w.numel())
    assert proxy_loss(w, every.qweight.dequantize() + every.outliers.dense(), h) < 1e-4 * before


def test_the_weight_that_costs_most_is_extracted_first():
    w, h = _layer()
    from bitcliff.quant.gptq import _Problem, _solve

    worst = int(_solve(_Problem.prepare(w, h, CONFIG, "w"), CONFIG, None, keep_scores=True).scores.argmax())
    result = gptq_quantize(w, h, CONFIG, outliers=1)
    assert result.outliers.nnz == 1 and int(result.outliers.dense().flatten().nonzero()) == worst


def test_a_budget_buys_its_row_pointers_first():
    assert outlier_budget(32 * 11, 10) == 0
    assert outlier_budget(32 * 11 + 64, 10) == 2
