"""The torch operators: registered, traceable (fake impls, torch.compile), CPU path ~ reference."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from bitcliff import QuantConfig
from bitcliff.kernels import cpu, ops, reference
from bitcliff.kernels.layout import from_gptq
from bitcliff.quant.qlinear import QuantLinear
from bitcliff.quant.rtn import quantize_rtn


def make_layer(k=96, n=40, bits=3, group_size=32, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, k, generator=gen)
    b = torch.randn(n, generator=gen) if bias else None
    qw = quantize_rtn(weight, QuantConfig(bits=bits, group_size=group_size))
    return QuantLinear.from_quantized(qw, group_size, b, "layer"), weight


def op_args(layer, x, capture="none", weight_fp=None):
    layout = from_gptq(layer.qweight, layer.qzeros, layer.scales, layer.g_idx, layer.bits)
    args = (x, *ops.layout_args(layout)[:5], layer.bias, *ops.layout_args(layout)[5:])
    return args + ((weight_fp,) if capture == "error" else ())


def test_ops_are_registered():
    for name in ("qmatmul", "qmatmul_stats", "qmatmul_error"):
        assert hasattr(torch.ops.bitcliff, name)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_cpu_op_matches_reference(bits):
    layer, weight = make_layer(bits=bits)
    x = torch.randn(2, 3, 96)
    with cpu.exact_activations():  # the product with the weights; the rounding's own tests: test_cpu.py
        y = torch.ops.bitcliff.qmatmul(*op_args(layer, x))
    y_ref = reference.dequant_matmul(x, layer.qweight, layer.qzeros, layer.scales, layer.g_idx, bits, layer.bias)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    y2, a, b = torch.ops.bitcliff.qmatmul_stats(*op_args(layer, x))
    torch.testing.assert_close(y2, y_ref, rtol=1e-5, atol=1e-5)
    stats = reference.output_stats(y_ref)
    torch.testing.assert_close(a, stats["sq_norm"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b, stats["abs_max"], rtol=1e-5, atol=1e-5)
    x = x.to(torch.bfloat16)
    w_fp = weight.to(torch.bfloat16)
    y3, err, fp = torch.ops.bitcliff.qmatmul_error(*op_args(layer, x, "error", w_fp))
    sig = reference.output_error(x, layer.dequantize(), w_fp, layer.bias)
    torch.testing.assert_close(err, sig["err_sq"], rtol=1e-5, atol=0)
    torch.testing.assert_close(fp, sig["fp_sq"], rtol=1e-5, atol=0)
    assert err.shape == (6,) and err.dtype == torch.float32


def test_opcheck():
    layer, weight = make_layer(k=64, n=16, bits=4, group_size=32)
    x = torch.randn(3, 64, dtype=torch.float16)
    torch.library.opcheck(torch.ops.bitcliff.qmatmul.default, op_args(layer, x))
    torch.library.opcheck(torch.ops.bitcliff.qmatmul_error.default,
                          op_args(layer, x, "error", weight.half()))


def test_fake_tensor_shapes():
    layer, weight = make_layer()
    real = op_args(layer, torch.randn(2, 5, 96, dtype=torch.float16), "error", weight.half())
    with FakeTensorMode() as mode:
        args = tuple(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in real)
        y = torch.ops.bitcliff.qmatmul(*args[:-1])
        y2, a, b = torch.ops.bitcliff.qmatmul_error(*args)
    assert y.shape == (2, 5, 40) and y.dtype == torch.float16
    assert y2.shape == (2, 5, 40) and a.shape == (10,) and b.dtype == torch.float32


def test_torch_compile_traces_the_op_in_one_graph():
    layer, _ = make_layer()
    layout = layer.kernel_layout()
    x = torch.randn(4, 96, dtype=torch.float16)

    def f(x):
        return ops.run(x, layout, layer.bias) * 2

    compiled = torch.compile(f, backend="eager", fullgraph=True)
    assert torch.equal(compiled(x), f(x))


def test_cached_kernel_layout_is_traced_without_graph_breaks():
    layer, _ = make_layer()
    x = torch.randn(4, 96, dtype=torch.float16)
    eager = ops.run(x, layer.kernel_layout(), layer.bias)  # built eagerly, as before compiling

    def f(x):
        return ops.run(x, layer.kernel_layout(), layer.bias)

    assert torch.equal(torch.compile(f, backend="eager", fullgraph=True)(x), eager)


def test_quantlinear_compiles_on_cpu():
    layer, _ = make_layer()
    x = torch.randn(2, 96)
    eager = layer(x)  # builds the cached layout outside the graph
    compiled = torch.compile(layer, backend="eager", fullgraph=True)
    assert torch.equal(compiled(x), eager)


def test_quantlinear_cpu_forward_is_the_cpu_path():
    layer, _ = make_layer(bits=2)
    x = torch.randn(2, 4, 96)
    y_ref = reference.dequant_matmul(x, layer.qweight, layer.qzeros, layer.scales, layer.g_idx, 2, layer.bias)
    with cpu.exact_activations():
        torch.testing.assert_close(layer(x), y_ref, rtol=1e-5, atol=1e-5)
    assert isinstance(layer.kernel_layout(), cpu.CpuLayout)  # no Triton layout on the CPU


def test_kernel_layout_is_cached_and_rebuilt_on_reload():
    layer, _ = make_layer()
    first = layer.kernel_layout()
    assert layer.kernel_layout() is first
    other, _ = make_layer(seed=1)
    layer.load_packed({k: getattr(other, k) for k in ("qweight", "qzeros", "scales", "g_idx")})
    second = layer.kernel_layout()
    assert second is not first
    assert torch.equal(cpu.dense_weight(second), cpu.dense_weight(other.kernel_layout()))
    layer.scales.mul_(2)  # in-place write
    assert layer.kernel_layout() is not second
