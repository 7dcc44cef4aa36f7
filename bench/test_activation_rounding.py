"""The perplexity check of the integer decode rounds each layer's input exactly as the kernel does."""

from __future__ import annotations

import torch

from bench.activation_rounding import rounded_inputs
from bitcliff import QuantConfig
from bitcliff.kernels import cpu, cpu_packed
from bitcliff.quant.qlinear import QuantLinear
from bitcliff.quant.rtn import quantize_rtn


def test_many_rows_under_the_rounding_equal_the_kernels_integer_decode_row_by_row():
    layer = QuantLinear.from_quantized(quantize_rtn(torch.randn(24, 128), QuantConfig(bits=3, group_size=32)), 32)
    assert isinstance(layer.kernel_layout(), cpu_packed.PackedLayout)
    x = torch.randn(40, 128)  # many rows: outside the block, the fp32 form
    with rounded_inputs(cpu_packed.ACT_LEVELS):
        rounded = layer(x)
    one_by_one = torch.cat([layer(row[None]) for row in x])  # one row each: the integer decode
    torch.testing.assert_close(rounded, one_by_one, rtol=1e-5, atol=1e-5)
    with cpu.exact_activations():  # where the kernel itself rounds many rows (AVX-512), without that rounding
        assert not torch.allclose(layer(x), one_by_one, rtol=0, atol=0)  # the forward is restored after the block


def test_another_device_or_a_bad_out_is_refused_before_any_model_loads(tmp_path, capsys):
    import pytest

    from bench.activation_rounding import main

    for argv, message in ((["--device", "cuda"], "--device cuda: the integer decode is the CPU kernel's"),
                          (["--out", str(tmp_path)], "must be a file in an existing folder")):
        with pytest.raises(SystemExit):
            main(argv)
        assert message in capsys.readouterr().err
