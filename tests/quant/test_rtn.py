"""RTN: codes on the grid, error bounds, symmetric zero, partial groups, bad weights."""

from __future__ import annotations

import pytest
import torch

from bitcliff.quant.config import QuantConfig
from bitcliff.quant.rtn import quantize_rtn


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size", [32, 64, -1])
@pytest.mark.parametrize("sym", [False, True])
def test_rtn_error_is_within_half_a_step(bits, group_size, sym):
    torch.manual_seed(bits * 100 + group_size)
    w = torch.randn(48, 160)
    qw = quantize_rtn(w, QuantConfig(bits=bits, group_size=group_size, sym=sym))
    assert qw.codes.shape == (160, 48) and int(qw.codes.max()) <= 2**bits - 1 and int(qw.codes.min()) >= 0
    if sym:
        assert (qw.zeros == 2 ** (bits - 1)).all()
    step = qw.scales.float()[qw.g_idx.long()].t()  # [N, K]
    err = (qw.dequantize() - w).abs()
    representable = (qw.codes > 0) & (qw.codes < 2**bits - 1)  # not clipped at either end
    # inside the grid rounding costs at most half a step; at the ends the integer zero point
    # (asym) or the one-sided symmetric grid may clip by up to one step
    assert (err[representable.t()] <= 0.5 * step[representable.t()] * (1 + 1e-3) + 1e-7).all()
    assert (err <= step * (1 + 1e-3) + 1e-7).all()


def test_partial_last_group_is_its_own_group():
    torch.manual_seed(1)
    w = torch.randn(8, 576)
    w[:, 512:] *= 100  # the partial group (64 columns) has a much larger range
    qw = quantize_rtn(w, QuantConfig(bits=4, group_size=128))
    assert qw.scales.shape == (5, 8)
    assert (qw.scales[4].float() > 20 * qw.scales[:4].float().max(dim=0).values).all()


def test_mse_clipping_never_worse():
    torch.manual_seed(2)
    w = torch.randn(64, 256) * torch.rand(64, 1)
    w[0, 0] = 12.0  # an outlier makes clipping worthwhile
    plain = quantize_rtn(w, QuantConfig(bits=3, group_size=64))
    clipped = quantize_rtn(w, QuantConfig(bits=3, group_size=64, mse=True))
    e_plain = ((plain.dequantize() - w) ** 2).sum(dim=1)
    e_clip = ((clipped.dequantize() - w) ** 2).sum(dim=1)
    assert (e_clip <= e_plain + 1e-6).all() and e_clip.sum() < 0.95 * e_plain.sum()


def test_zero_group_and_exact_zero():
    w = torch.zeros(4, 64)
    w[1, 3] = 0.5
    qw = quantize_rtn(w, QuantConfig(bits=2, group_size=32))
    dq = qw.dequantize()
    assert torch.isfinite(dq).all() and (dq[w == 0] == 0).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weight_names_the_layer(bad):
    w = torch.randn(4, 64)
    w[2, 5] = bad
    with pytest.raises(ValueError, match="model.layers.3.mlp.up_proj.*non-finite"):
        quantize_rtn(w, QuantConfig(bits=4, group_size=32), name="model.layers.3.mlp.up_proj")
