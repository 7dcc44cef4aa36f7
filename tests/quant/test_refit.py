"""Least-squares scale refit after GPTQ (bitcliff.quant.refit)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from bitcliff.quant.config import QuantConfig
from bitcliff.quant.gptq import gptq_quantize, proxy_loss, split_result
from bitcliff.quant.qweight import QuantizedWeight
from bitcliff.quant.refit import refit_scales
from tests.quant.test_gptq import correlated, hessian_of, weight


def gptq(**kw) -> QuantConfig:
    """The published algorithm unless a test asks for more (the solver tests compare against it)."""
    return QuantConfig.paper_gptq(**kw)


@pytest.mark.parametrize(
    "cfg",
    [
        dict(bits=2, group_size=32),
        dict(bits=3, group_size=32, static_groups=True),
        dict(bits=4, group_size=-1),
        dict(bits=3, group_size=32, act_order=True),  # non-contiguous g_idx
        dict(bits=3, group_size=48),  # partial last group
        dict(bits=4, group_size=32, sym=True),
    ],
)
def test_refit_lowers_the_output_error_and_keeps_codes(cfg):
    k, n = 112, 64
    h = hessian_of(correlated(k))
    w = weight(n, k)
    plain = gptq_quantize(w, h, gptq(**cfg), "toy")
    refitted = gptq_quantize(w, h, gptq(refit_rounds=1, **cfg), "toy")
    before = proxy_loss(w, plain.qweight.dequantize(), h)
    after = proxy_loss(w, refitted.qweight.dequantize(), h)
    assert after < 0.99 * before  # the codes fix far more than the scales: there is slack to take
    q0, q1 = plain.qweight, refitted.qweight
    assert torch.equal(q0.codes, q1.codes) and torch.equal(q0.zeros, q1.zeros) and torch.equal(q0.g_idx, q1.g_idx)
    assert q1.scales.dtype == torch.float16 and (q1.scales.float() > 0).all()
    assert refitted.refit_rows.dtype == torch.bool and refitted.refit_rows.shape == (n,)
    assert refitted.refit_rows.any()
    assert plain.refit_rows is None
    assert refitted.loss == pytest.approx(plain.loss)  # the solve's objective, before the refit


def test_no_row_gets_worse():
    k, n = 96, 80
    h = hessian_of(correlated(k, seed=3))
    w = weight(n, k, seed=4)
    qw = gptq_quantize(w, h, gptq(bits=2, group_size=32), "toy").qweight
    new, changed = refit_scales(w, h, qw)
    err = lambda q: (((w - q.dequantize()) @ h) * (w - q.dequantize())).sum(dim=1)  # noqa: E731
    before, after = err(qw), err(new)
    assert (after <= before * (1 + 1e-5)).all()
    assert torch.equal(changed, (new.scales != qw.scales).any(dim=0))
    assert (after[changed] < before[changed]).all()


def test_wrong_scales_are_recovered_exactly():
    """Weights that lie on a grid, given the right codes but scales 30% off: the least-squares
    fit must return the true (fp16) scales, whatever the Hessian."""
    k, n, gs = 64, 24, 16
    gen = torch.Generator().manual_seed(7)
    codes = torch.randint(0, 8, (k, n), generator=gen, dtype=torch.int32)
    zeros = torch.randint(2, 6, (k // gs, n), generator=gen, dtype=torch.int32)
    scales = (torch.rand(k // gs, n, generator=gen) * 0.02 + 0.005).half()
    g_idx = torch.arange(k, dtype=torch.int32) // gs
    truth = QuantizedWeight(codes, scales, zeros, g_idx, 3)
    w = truth.dequantize()
    off = QuantizedWeight(codes, (scales.float() * 1.3).half(), zeros, g_idx, 3)
    fixed, changed = refit_scales(w, hessian_of(correlated(k)), off)
    assert changed.all()
    torch.testing.assert_close(fixed.scales.float(), scales.float(), rtol=2e-3, atol=0)


def test_a_group_with_every_code_at_its_zero_keeps_its_scale():
    k, n, gs = 64, 8, 32
    gen = torch.Generator().manual_seed(2)
    codes = torch.randint(0, 4, (k, n), generator=gen, dtype=torch.int32)
    zeros = torch.full((2, n), 1, dtype=torch.int32)
    codes[:gs] = 1  # group 0 is all zero points: its scale has no effect
    scales = torch.full((2, n), 0.01, dtype=torch.float16)
    qw = QuantizedWeight(codes, scales, zeros, torch.arange(k, dtype=torch.int32) // gs, 2)
    w = weight(n, k, seed=9)
    new, _ = refit_scales(w, hessian_of(correlated(k)), qw)
    assert torch.equal(new.scales[0], scales[0])
    assert torch.isfinite(new.scales.float()).all() and (new.scales.float() > 0).all()


def test_split_keeps_each_parts_refit_rows():
    k = 64
    h = hessian_of(correlated(k))
    w = torch.cat([weight(20, k, seed=1), weight(12, k, seed=2)])
    result = gptq_quantize(w, h, gptq(bits=3, group_size=32, refit_rounds=1), "toy")
    parts = split_result(result, [20, 12])
    assert torch.equal(torch.cat([p.refit_rows for p in parts]), result.refit_rows)


def test_mismatched_shapes_are_named():
    qw = gptq_quantize(weight(8, 32), hessian_of(correlated(32)), gptq(bits=4, group_size=16), "toy").qweight
    with pytest.raises(ValueError, match="same layer"):
        refit_scales(weight(8, 48), hessian_of(correlated(48)), qw)


def test_config_round_trip():
    config = gptq(bits=3, group_size=64, refit_rounds=1)
    assert QuantConfig.from_dict(config.to_dict()) == config
    legacy = {k: v for k, v in config.to_dict().items() if k != "refit_rounds"}
    assert QuantConfig.from_dict(legacy) == dataclasses.replace(config, refit_rounds=0)
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="refit_rounds"):
            gptq(bits=3, refit_rounds=bad)


@pytest.mark.parametrize(
    "cfg",
    [
        dict(bits=2, group_size=32),
        dict(bits=3, group_size=32, act_order=True),  # re-solves keep the act-order g_idx
        dict(bits=3, group_size=32, act_order=True, static_groups=True),
        dict(bits=4, group_size=-1),
    ],
)
def test_each_round_lowers_the_output_error(cfg):
    k, n = 96, 48
    h = hessian_of(correlated(k, seed=5))
    w = weight(n, k, seed=6)
    errors, g_idx = [], None
    for rounds in range(4):
        result = gptq_quantize(w, h, gptq(refit_rounds=rounds, **cfg), "toy")
        errors.append(proxy_loss(w, result.qweight.dequantize(), h))
        if g_idx is None:
            g_idx = result.qweight.g_idx
        assert torch.equal(result.qweight.g_idx, g_idx)
        assert (result.qweight.scales.float() > 0).all()
        assert int(result.qweight.codes.min()) >= 0 and int(result.qweight.codes.max()) < 2 ** cfg["bits"]
    # Every row keeps the better of two rounds, so no round can make the layer worse.
    assert errors[1] < errors[0] and errors[2] <= errors[1] * (1 + 1e-6) and errors[3] <= errors[2] * (1 + 1e-6)
    assert errors[3] < 0.95 * errors[0]


def test_a_round_on_a_grid_reproduces_gptq_with_that_grid_fixed():
    """Round 2 solves on round 1's refitted grid: with a fixed grid the solve is static-groups GPTQ,
    so re-solving on a static solution's own grid must give back the same codes."""
    k, n = 64, 24
    h = hessian_of(correlated(k, seed=8))
    w = weight(n, k, seed=9)
    config = gptq(bits=3, group_size=32, static_groups=True)
    static = gptq_quantize(w, h, config, "toy")
    from bitcliff.quant.gptq import _Problem, _solve

    again = _solve(_Problem.prepare(w, h, config, "toy"), config, grid=static.qweight)
    assert torch.equal(again.qweight.codes, static.qweight.codes)
    assert torch.equal(again.qweight.scales, static.qweight.scales)
