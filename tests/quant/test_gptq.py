"""GPTQ on single weight matrices: Hessian, solve, grids, act-order, failures."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch

from bitcliff.kernels.pack import default_g_idx
from bitcliff.quant.config import QuantConfig
from bitcliff.quant.gptq import (
    concat_rows,
    gptq_quantize,
    inverse_hessian_factor,
    proxy_loss,
    split_result,
)
from bitcliff.quant.qlinear import QuantLinear
from bitcliff.quant.rtn import quantize_rtn
from bitcliff.statistics import HessianAccumulator


def gptq_config(**kw) -> QuantConfig:
    kw.setdefault("method", "gptq")
    return QuantConfig.paper_gptq(**{k: v for k, v in kw.items() if k != "method"})


def correlated(k: int, tokens: int = 2048, seed: int = 0) -> torch.Tensor:
    """Activations with strongly correlated channels of unequal scale (as in real layers)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k**0.5
    scale = torch.exp(torch.randn(k, generator=g))
    return (torch.randn(tokens, k, generator=g) @ mix + 0.05 * torch.randn(tokens, k, generator=g)) * scale


def hessian_of(x: torch.Tensor) -> torch.Tensor:
    acc = HessianAccumulator(x.shape[-1])
    acc.add(x)
    return acc.hessian()


def weight(n: int, k: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05


# ----------------------------------------------------------------------------- Hessian


@pytest.mark.parametrize("k", [48, 600, 1100])  # full product, 4- and 8-block lower staircase
def test_hessian_is_2xxt_over_n_in_any_chunking(k):
    x = torch.randn(3, 70, k, dtype=torch.float64).float()
    acc = HessianAccumulator(k)
    acc.add(x[:1])
    acc.add(x[1:])
    flat = x.reshape(-1, k).double()
    expected = 2 * flat.t() @ flat / flat.shape[0]
    h = acc.hessian()
    assert acc.count == 210
    assert h.dtype == torch.float32
    assert torch.equal(h, h.t())
    torch.testing.assert_close(h.double(), expected, rtol=1e-4, atol=1e-4)


def test_hessian_errors():
    acc = HessianAccumulator(8)
    with pytest.raises(ValueError, match="no calibration tokens"):
        acc.hessian()
    with pytest.raises(ValueError, match="expects 8"):
        acc.add(torch.randn(4, 9))
    with pytest.raises(ValueError):
        HessianAccumulator(0)


# ----------------------------------------------------------------------------- quality


@pytest.mark.parametrize(
    "cfg",
    [
        dict(bits=4, group_size=32),
        dict(bits=3, group_size=64),
        dict(bits=2, group_size=32),
        dict(bits=3, group_size=-1),
        dict(bits=3, group_size=32, act_order=True),
        dict(bits=3, group_size=32, act_order=True, static_groups=True),
        dict(bits=3, group_size=32, static_groups=True),
        dict(bits=3, group_size=32, mse=True),
        dict(bits=4, group_size=32, sym=True),
    ],
)
def test_gptq_beats_rtn_on_correlated_inputs(cfg):
    k, n = 128, 96
    h = hessian_of(correlated(k))
    w = weight(n, k)
    config = gptq_config(**cfg)
    result = gptq_quantize(w, h, config, "toy")
    rtn = quantize_rtn(w, config, "toy")
    gptq_err = proxy_loss(w, result.qweight.dequantize(), h)
    rtn_err = proxy_loss(w, rtn.dequantize(), h)
    # At 2 bits, grids fitted on the error-updated weights stretch, so the margin is smaller.
    assert gptq_err < (1.0 if config.bits == 2 and not config.static_groups else 0.8) * rtn_err
    assert result.fallback is None and result.damp_percent == config.damp_percent
    assert result.loss > 0 and torch.isclose(result.row_loss.sum(), torch.tensor(result.loss))


def test_proxy_loss_is_twice_mean_squared_output_error():
    x = correlated(32, tokens=500).double().float()
    w, w_hat = weight(16, 32), weight(16, 32, seed=5)
    direct = float(((x @ (w - w_hat).t()) ** 2).sum(dim=1).mean()) * 2
    assert proxy_loss(w, w_hat, hessian_of(x)) == pytest.approx(direct, rel=1e-3)


# ----------------------------------------------------------------------------- grid exactness


@pytest.mark.parametrize("act_order", [False, True])
def test_codes_lie_on_the_stored_grid(act_order):
    k, n, bits = 96, 40, 3
    config = gptq_config(bits=bits, group_size=32, act_order=act_order)
    result = gptq_quantize(weight(n, k), hessian_of(correlated(k)), config, "toy")
    qw = result.qweight
    assert qw.codes.dtype == torch.int32 and qw.codes.shape == (k, n)
    assert qw.scales.dtype == torch.float16 and qw.scales.shape == (3, n)
    assert qw.zeros.dtype == torch.int32 and qw.g_idx.dtype == torch.int32
    assert int(qw.codes.min()) >= 0 and int(qw.codes.max()) <= 2**bits - 1
    assert int(qw.zeros.min()) >= 0 and int(qw.zeros.max()) <= 2**bits - 1
    assert torch.isfinite(qw.scales.float()).all() and (qw.scales.float() > 0).all()
    # Packing round trip: the layer computes exactly the weight GPTQ produced.
    layer = QuantLinear.from_quantized(qw, config.group_size)
    assert torch.equal(layer.dequantize(), qw.dequantize())


def test_uncorrelated_inputs_give_exactly_rtn():
    """With a diagonal Hessian no error is propagated: GPTQ must land on RTN's codes bit for bit,
    which shows that its error feedback used exactly the stored (fp16-scale, integer-zero) grid."""
    k, n = 96, 48
    h = torch.diag(torch.rand(k) + 0.5)
    w = weight(n, k)
    for cfg in (dict(bits=3, group_size=32), dict(bits=2, group_size=-1), dict(bits=4, group_size=32, mse=True)):
        config = gptq_config(**cfg)
        got = gptq_quantize(w, h, config, "toy").qweight
        want = quantize_rtn(w, config, "toy")
        assert torch.equal(got.codes, want.codes)
        assert torch.equal(got.scales, want.scales)
        assert torch.equal(got.zeros, want.zeros)
        assert torch.equal(got.dequantize(), want.dequantize())


def test_partial_last_group():
    k, n = 80, 24  # g32: groups of 32, 32, 16 (like K=576 with g128)
    config = gptq_config(bits=3, group_size=32)
    h = hessian_of(correlated(k))
    w = weight(n, k)
    qw = gptq_quantize(w, h, config, "toy").qweight
    assert qw.scales.shape == (3, n)
    assert torch.equal(qw.g_idx, default_g_idx(k, 32))
    assert proxy_loss(w, qw.dequantize(), h) < proxy_loss(w, quantize_rtn(w, config).dequantize(), h)


def test_group_size_not_dividing_the_block():
    k, n = 150, 16  # g48 with block 128: groups must still see every earlier update
    config = gptq_config(bits=3, group_size=48)
    h = hessian_of(correlated(k))
    w = weight(n, k)
    qw = gptq_quantize(w, h, config, "toy").qweight
    assert qw.scales.shape == (4, n)
    assert proxy_loss(w, qw.dequantize(), h) < proxy_loss(w, quantize_rtn(w, config).dequantize(), h)


# ----------------------------------------------------------------------------- act-order


def test_act_order_groups_follow_descending_hessian_diagonal():
    k, n, gs = 96, 16, 32
    x = correlated(k)
    h = hessian_of(x)
    result = gptq_quantize(weight(n, k), h, gptq_config(bits=3, group_size=gs, act_order=True), "toy")
    order = torch.argsort(h.diagonal(), descending=True, stable=True)
    expected = torch.empty(k, dtype=torch.int32)
    expected[order] = (torch.arange(k) // gs).to(torch.int32)
    assert torch.equal(result.qweight.g_idx, expected)
    assert sorted(torch.bincount(result.qweight.g_idx.long()).tolist()) == [gs] * 3
    assert not torch.equal(result.qweight.g_idx, default_g_idx(k, gs))  # the test means something


def test_act_order_with_static_groups_keeps_contiguous_g_idx():
    k, n = 96, 16
    h = hessian_of(correlated(k))
    w = weight(n, k)
    config = gptq_config(bits=3, group_size=32, act_order=True, static_groups=True)
    qw = gptq_quantize(w, h, config, "toy").qweight
    assert torch.equal(qw.g_idx, default_g_idx(k, 32))
    # static grids are RTN's grids on the original weights
    rtn = quantize_rtn(w, config)
    assert torch.equal(qw.scales, rtn.scales) and torch.equal(qw.zeros, rtn.zeros)


# ----------------------------------------------------------------------------- failure handling


def test_dead_columns_are_quantized_to_zero():
    k, n = 64, 16
    x = correlated(k)
    x[:, [3, 40]] = 0.0  # channels never active in the calibration data
    h = hessian_of(x)
    w = weight(n, k)
    result = gptq_quantize(w, h, gptq_config(bits=3, group_size=32, act_order=True), "toy")
    deq = result.qweight.dequantize()
    assert torch.isfinite(deq).all() and result.fallback is None
    assert torch.equal(deq[:, [3, 40]], torch.zeros(n, 2))


def test_indefinite_hessian_falls_back_to_rtn_with_a_warning(caplog):
    k, n = 64, 16
    h = torch.eye(k)
    h[0, 0] = -40.0  # beyond repair by any dampening up to the cap
    w = weight(n, k)
    config = gptq_config(bits=3, group_size=32)
    with caplog.at_level(logging.INFO, logger="bitcliff.quant.gptq"):
        with pytest.warns(RuntimeWarning, match="model.layers.3.mlp.down_proj.*RTN"):
            result = gptq_quantize(w, h, config, "model.layers.3.mlp.down_proj")
    assert result.fallback and result.damp_percent is None and result.loss is None
    rtn = quantize_rtn(w, config)
    assert torch.equal(result.qweight.codes, rtn.codes) and torch.equal(result.qweight.scales, rtn.scales)
    assert "Cholesky failed at damp_percent=0.01" in caplog.text
    assert "retrying with 1" in caplog.text


def test_dampening_is_raised_until_the_factorization_works(caplog):
    k, n = 64, 16
    h = torch.eye(k)
    h[0, 0] = -0.5  # mean diag ~0.98: 1% and 10% dampening fail, 100% works
    with caplog.at_level(logging.INFO, logger="bitcliff.quant.gptq"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            result = gptq_quantize(weight(n, k), h, gptq_config(bits=3, group_size=32), "toy")
    assert result.fallback is None and result.damp_percent == pytest.approx(1.0)
    assert caplog.text.count("Cholesky failed") == 2
    _, damp = inverse_hessian_factor(torch.eye(4), 0.01)
    assert damp == 0.01


def test_non_finite_hessian_falls_back_and_non_finite_weight_raises():
    k, n = 32, 8
    h = torch.eye(k)
    h[1, 2] = float("nan")
    with pytest.warns(RuntimeWarning, match="NaN"):
        assert gptq_quantize(weight(n, k), h, gptq_config(bits=4, group_size=32), "toy").fallback
    w = weight(n, k)
    w[0, 0] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        gptq_quantize(w, torch.eye(k), gptq_config(bits=4, group_size=32), "toy")
    with pytest.raises(ValueError, match="do not match"):
        gptq_quantize(weight(n, k), torch.eye(k + 1), gptq_config(bits=4, group_size=32), "toy")


# ----------------------------------------------------------------------------- shared Hessians


def test_stacked_solve_matches_separate_solves():
    k = 64
    h = hessian_of(correlated(k))
    a, b = weight(24, k, seed=2), weight(40, k, seed=3)
    config = gptq_config(bits=3, group_size=32)
    parts = split_result(gptq_quantize(torch.cat([a, b]), h, config, "ab"), [24, 40])
    for part, w in zip(parts, (a, b)):
        alone = gptq_quantize(w, h, config, "alone")
        agree = (part.qweight.codes == alone.qweight.codes).float().mean()
        assert agree > 0.99
        assert part.loss == pytest.approx(alone.loss, rel=1e-3)
        assert part.qweight.codes.shape == (k, w.shape[0])
    with pytest.raises(ValueError, match="add up"):
        split_result(parts[0], [1, 2])


@pytest.mark.parametrize("refit_rounds", [0, 2])
def test_row_blocks_solved_apart_concatenate_to_the_whole_solve(refit_rounds):
    k = 96
    h = hessian_of(correlated(k))
    w = weight(70, k, seed=4)
    config = gptq_config(bits=3, group_size=32, refit_rounds=refit_rounds)
    whole = gptq_quantize(w, h, config, "whole")
    joined = concat_rows([gptq_quantize(w[a:b], h, config, "block") for a, b in ((0, 35), (35, 70))])
    assert torch.equal(joined.qweight.codes, whole.qweight.codes)
    assert torch.equal(joined.qweight.scales, whole.qweight.scales)
    assert torch.equal(joined.qweight.zeros, whole.qweight.zeros)
    assert joined.loss == pytest.approx(whole.loss, rel=1e-6)
    assert (joined.refit_rows is None) == (refit_rounds == 0)
    other = gptq_quantize(w[:8], h, gptq_config(bits=4, group_size=32), "other")
    with pytest.raises(ValueError, match="different grids"):
        concat_rows([whole, other])
