"""QuantLinear is a drop-in nn.Linear: same results as the dequantized weight in nn.Linear."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bitcliff import QuantConfig, quantize
from bitcliff.kernels.cpu import exact_activations
from bitcliff.quant.qlinear import QuantLinear
from bitcliff.quant.rtn import quantize_rtn

# quantized vs float: the dequantized weight in nn.Linear, same dtype, so only the matmul's
# rounding differs (the reference accumulates in fp32 and rounds once at the end).
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_dequantized_linear(dtype, bits, bias):
    torch.manual_seed(bits)
    linear = nn.Linear(96, 40, bias=bias)
    qw = quantize_rtn(linear.weight, QuantConfig(bits=bits, group_size=32))
    qlinear = QuantLinear.from_quantized(qw, 32, linear.bias, "layer")
    dense = nn.Linear(96, 40, bias=bias)
    with torch.no_grad():
        dense.weight.copy_(qlinear.dequantize())
        if bias:
            dense.bias.copy_(linear.bias)
    x = torch.randn(2, 5, 96)  # leading batch dims
    with exact_activations():  # the dequantized weight's product; the kernel's rounding: tests/kernels/test_cpu.py
        y = qlinear(x.to(dtype))
    y_ref = dense(x.double().float()).to(dtype)
    assert y.dtype == dtype and y.shape == (2, 5, 40)
    rel = (y.float() - y_ref.float()).norm() / y_ref.float().norm()
    assert rel < TOLERANCE[dtype]


def test_wrong_input_width_is_named():
    qw = quantize_rtn(torch.randn(8, 64), QuantConfig(bits=4, group_size=32))
    layer = QuantLinear.from_quantized(qw, 32, None, "model.layers.0.mlp.down_proj")
    with pytest.raises(ValueError, match="down_proj.*63 features, expected 64"):
        layer(torch.randn(1, 63))


def test_load_packed_rejects_wrong_shapes():
    layer = QuantLinear(64, 8, 4, 32, 2, name="l")
    good = quantize_rtn(torch.randn(8, 64), QuantConfig(bits=4, group_size=32)).packed()
    bad = dict(good, scales=torch.ones(3, 8, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"l.scales: checkpoint shape \(3, 8\)"):
        layer.load_packed(bad)


def test_whole_model_conversion_skips_head_and_keeps_quality(tiny_llama):
    ids = torch.randint(0, 128, (2, 12))
    ref = tiny_llama(ids).logits
    quantize(tiny_llama, QuantConfig(bits=4, group_size=32), progress=False)
    names = [n for n, m in tiny_llama.named_modules() if isinstance(m, QuantLinear)]
    assert len(names) == 2 * 7 and not any("lm_head" in n for n in names)
    assert type(tiny_llama.lm_head) is nn.Linear
    out = tiny_llama(ids).logits
    assert (out - ref).norm() / ref.norm() < 0.15


def test_custom_skip_patterns(tiny_llama):
    quantize(tiny_llama, QuantConfig(bits=4, group_size=32, skip_modules=("lm_head", "*.mlp.*")), progress=False)
    kinds = {n.split(".")[-1]: type(m).__name__ for n, m in tiny_llama.named_modules() if n.count(".") == 4}
    assert kinds["gate_proj"] == "Linear" and kinds["q_proj"] == "QuantLinear"
