"""The CPU dequant-matmul path against the reference: both forms (the compiled kernel on packed
codes, and the plain-torch fallback), every width, awkward shapes and group orders, both
schedules (grouped for few rows, dense for many), captures, and dtypes.

Tolerances (kernel vs reference): fp32 outputs agree to 1e-5 relative to the output's scale
(only the float32 summation order differs); fp16/bf16 outputs to one rounding of their dtype.
"""

from __future__ import annotations

import pytest
import torch

from bitcliff import QuantConfig
from bitcliff.kernels import cpu, cpu_packed, reference
from bitcliff.kernels.cpu_build import native_ops
from bitcliff.kernels.layout import from_gptq
from bitcliff.kernels.reference import CaptureMode
from bitcliff.quant.qlinear import QuantLinear
from bitcliff.quant.qweight import QuantizedWeight
from bitcliff.quant.rtn import quantize_rtn

ROWS = sorted({1, 3, 17, cpu.GROUPED_MAX_ROWS, cpu.GROUPED_MAX_ROWS + 1, cpu_packed.GEMV_MAX_ROWS + 1, 118})
FORMS = ["packed", "bytes"]
TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1e-2)}


def _layer(k, n, bits, group_size, g_idx=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, k, generator=gen)
    qw = quantize_rtn(weight, QuantConfig(bits=bits, group_size=group_size))
    if g_idx is not None:  # an act-order style grid: groups of the same codes, shuffled columns
        qw = QuantizedWeight(qw.codes, qw.scales, qw.zeros, g_idx.to(torch.int32), bits)
    layer = QuantLinear.from_quantized(qw, group_size, torch.randn(n, generator=gen), "layer")
    return layer, weight


def _cpu_layout(layer, form):
    """The layer's CPU layout in ``form``: the compiled kernel's (packed) or the fallback's (bytes)."""
    layout = from_gptq(layer.qweight, layer.qzeros, layer.scales, layer.g_idx, layer.bits)
    if form == "packed":
        assert native_ops() is not None, "the compiled CPU kernel did not build on this machine"
        return cpu_packed.pack(layout)
    return cpu.byte_layout(layout)


def _reference(layer, x, layout=None):
    """The reference product; for a compiled layout whose integer variant takes x's rows, of the
    activations as that variant rounds them (``cpu_packed.rounded_activations``)."""
    rows = x.reshape(-1, x.shape[-1])
    if isinstance(layout, cpu_packed.PackedLayout) and cpu_packed.takes_integer_activations(layout, rows.shape[0],
                                                                                              native_ops()):
        rounded = cpu_packed.rounded_activations(rows, layout).view(x.shape)
        y = reference.dequant_matmul(rounded, layer.qweight, layer.qzeros, layer.scales, layer.g_idx, layer.bits,
                                     layer.bias)
        return y.to(x.dtype)
    return reference.dequant_matmul(x, layer.qweight, layer.qzeros, layer.scales, layer.g_idx, layer.bits, layer.bias)


def _check(y, ref):
    rtol, atol = TOLERANCE[ref.dtype]
    scale = float(ref.float().abs().max())
    torch.testing.assert_close(y.float(), ref.float(), rtol=rtol, atol=atol * max(scale, 1.0))


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("k,n,group_size", [(96, 40, 32), (576, 48, 128), (100, 17, -1), (160, 24, 64),
                                            (200, 13, 64)])
@pytest.mark.parametrize("rows", ROWS)
def test_matches_the_reference(form, bits, k, n, group_size, rows):
    layer, _ = _layer(k, n, bits, group_size)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows))
    layout = _cpu_layout(layer, form)
    _check(cpu.matmul(x, layout, layer.bias), _reference(layer, x, layout))


def test_a_layer_runs_the_compiled_kernel():
    layer, _ = _layer(96, 40, 3, 32)
    assert isinstance(layer.kernel_layout(), cpu_packed.PackedLayout)
    x = torch.randn(2, 96)
    _check(layer(x), _reference(layer, x, layer.kernel_layout()))


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("rows", [1, 40])
def test_act_order_and_uneven_groups(form, rows):
    k, n, gs = 128, 24, 32
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(5))
    layer, _ = _layer(k, n, 3, gs, g_idx=perm // gs)  # groups of 32 scattered over K
    x = torch.randn(rows, k)
    layout = _cpu_layout(layer, form)
    _check(cpu.matmul(x, layout, layer.bias), _reference(layer, x, layout))
    uneven = torch.randint(0, 4, (k,), generator=torch.Generator().manual_seed(6))  # groups of any size
    layer, _ = _layer(k, n, 4, gs, g_idx=uneven)
    layout = _cpu_layout(layer, form)
    assert layout.columns is not None
    _check(cpu.matmul(x, layout, layer.bias), _reference(layer, x, layout))


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_the_compiled_kernel_forms_the_reference_weight_exactly(bits):
    layer, _ = _layer(200, 24, bits, 64)
    layout = _cpu_layout(layer, "packed")
    dense = cpu.dense_weight(layout)  # [positions, N] in position order
    columns = torch.arange(layout.positions) if layout.columns is None else layout.columns
    real = columns < 200  # the rest are padding positions
    assert torch.equal(dense[real], layer.dequantize().t()[columns[real]])


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("rows", [1, 5, 64])
def test_the_compiled_kernel_gives_the_same_bytes_for_any_thread_count(bits, rows):
    layer, _ = _layer(1024, 200, bits, 64)
    layout = _cpu_layout(layer, "packed")
    x = torch.randn(rows, 1024)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu.matmul(x, layout)
        torch.set_num_threads(2)
        two = cpu.matmul(x, layout)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


@pytest.mark.parametrize("bits,group_size,stored_bits", [(4, 128, 4.0), (2, 64, 2.0), (3, 128, 3.0), (3, 64, 3.0),
                                                        (3, 32, 3.0)])
def test_the_compiled_kernel_reads_packed_codes(bits, group_size, stored_bits):
    k, n = 512, 64
    layer, _ = _layer(k, n, bits, group_size)
    layout = _cpu_layout(layer, "packed")
    assert layout.words.dtype == torch.int32
    assert layout.words.numel() * 32 / (k * n) == stored_bits
    groups = k // group_size
    assert layout.scales.numel() == layout.zeros.numel() == groups * n  # fp16 scale and uint8 zero per group


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_activations(form, dtype):
    layer, _ = _layer(96, 40, 4, 32)
    layout = _cpu_layout(layer, form)
    for rows in (1, 64):
        x = torch.randn(2, rows, 96).to(dtype)
        y = cpu.matmul(x, layout, layer.bias)
        assert y.dtype == dtype and y.shape == (2, rows, 40)
        _check(y, _reference(layer, x, layout))


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("rows", [1, 50])
def test_captures_match_the_reference(form, rows):
    layer, weight = _layer(96, 40, 3, 32)
    layout = _cpu_layout(layer, form)
    x = torch.randn(rows, 96)
    y, sq, mx = cpu.matmul(x, layout, layer.bias, CaptureMode.STATS)  # captures keep the activations exact
    stats = reference.output_stats(_reference(layer, x))
    _check(y, _reference(layer, x))
    torch.testing.assert_close(sq, stats["sq_norm"], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(mx, stats["abs_max"], rtol=1e-5, atol=1e-5)
    y, err, fp = cpu.matmul(x, layout, layer.bias, CaptureMode.ERROR, weight)
    signals = reference.output_error(x, layer.dequantize(), weight, layer.bias)
    torch.testing.assert_close(err, signals["err_sq"], rtol=1e-3, atol=1e-4)  # a difference of near values
    torch.testing.assert_close(fp, signals["fp_sq"], rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="needs the full-precision weight"):
        cpu.matmul(x, layout, layer.bias, CaptureMode.ERROR)


def test_the_fallback_layout_holds_one_byte_per_code():
    layer, _ = _layer(576, 48, 2, 64)
    layout = _cpu_layout(layer, "bytes")
    assert layout.codes.dtype == torch.uint8 and layout.codes.shape == (9, 64, 48)
    assert int(layout.codes.max()) <= 3


def test_capture_mode_is_parsed_once_with_a_clear_error():
    assert CaptureMode.parse("error") is CaptureMode.ERROR
    assert CaptureMode.ERROR.signals == ("err_sq", "fp_sq") and CaptureMode.NONE.signals == ()
    with pytest.raises(ValueError, match=r"capture mode must be one of \['none', 'stats', 'error'\], got 'errors'"):
        CaptureMode.parse("errors")


@pytest.mark.parametrize("rows", [1, 20])
def test_the_compiled_operator_passes_opcheck(rows):
    layer, _ = _layer(100, 24, 3, 32)
    layout = _cpu_layout(layer, "packed")
    args = (torch.randn(2, rows, 100), layout.words, layout.scales, layout.zeros, layout.columns, layer.bias,
            3, 100, 24, cpu_packed.GEMV_MAX_ROWS, cpu_packed.SLAB_BYTES, True)
    torch.library.opcheck(torch.ops.bitcliff_cpu.linear.default, args)


def test_the_compiled_operator_names_what_does_not_fit():
    layer, _ = _layer(96, 40, 4, 32)
    layout = _cpu_layout(layer, "packed")
    with pytest.raises(RuntimeError, match="out_features 41 does not fit 5 column blocks"):
        torch.ops.bitcliff_cpu.linear(torch.randn(1, 96), layout.words, layout.scales, layout.zeros, None, None,
                                      4, 96, 41, 16, 2**20, True)
    with pytest.raises(RuntimeError, match="bits must be 2, 3 or 4, got 5"):
        torch.ops.bitcliff_cpu.linear(torch.randn(1, 96), layout.words, layout.scales, layout.zeros, None, None,
                                      5, 96, 40, 16, 2**20, True)
    with pytest.raises(RuntimeError, match="x has 50 features, the weight 96"):
        torch.ops.bitcliff_cpu.linear(torch.randn(1, 50), layout.words, layout.scales, layout.zeros, None, None,
                                      4, 96, 40, 16, 2**20, True)


def test_packing_a_few_columns_at_a_time_gives_the_same_layout(monkeypatch):
    layer, _ = _layer(200, 100, 3, 64)
    whole = _cpu_layout(layer, "packed")
    monkeypatch.setattr(cpu_packed, "PACK_COLUMNS", 24)
    chunked = _cpu_layout(layer, "packed")
    assert torch.equal(whole.words, chunked.words) and torch.equal(whole.scales, chunked.scales)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("act_order", [False, True])
def test_many_rows_run_through_tiles_of_columns_and_slabs_of_positions(bits, act_order, monkeypatch):
    """The many-rows schedule where it splits the weight both ways: N = 600 is two tiles of 256
    columns and a part, and a slab of 3 groups of 64 over K = 438 (7 groups, the last partial) is
    two full slabs and a short one.  (With fp32 activations: the AVX-512 build multiplies many rows
    as integers otherwise, and its 64-column tiles cross N = 600 too: 9 and a part.)"""
    monkeypatch.setattr(cpu_packed, "SLAB_BYTES", 3 * 64 * 256 * 4)
    k, n, gs = 438, 600, 64
    g_idx = torch.randperm(k, generator=torch.Generator().manual_seed(5)) % 7 if act_order else None
    layer, _ = _layer(k, n, bits, gs, g_idx=g_idx)
    layout = _cpu_layout(layer, "packed")
    assert (layout.columns is not None) == act_order
    x = torch.randn(cpu_packed.GEMV_MAX_ROWS + 7, k)
    _check(cpu_packed.linear(x, layout, layer.bias, native_ops(), integer_activations=False), _reference(layer, x))
    _check(cpu_packed.linear(x, layout, layer.bias, native_ops()), _reference(layer, x, layout))


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("k,n,group_size", [(96, 40, 32), (576, 48, 128), (100, 17, -1), (1024, 24, 256)])
@pytest.mark.parametrize("rows", [1, 2, cpu_packed.INT_MAX_ROWS, 7, 70])
def test_integer_activations_stay_within_their_rounding_bound(bits, k, n, group_size, rows):
    """Against the exact product, each rounded activation is off by at most half its group's step
    d, so ``|y - y_exact| <= sum over groups of d / 2 * sum |W|``; with the rounding off, the
    kernel is the fp32 product.  (7 and 70 rows: the many-rows integer product, gemm_int, which
    the AVX-512 build has; 7 rows leave a short tile of rows, and n = 17 and 24 short column tiles.)"""
    layer, _ = _layer(k, n, bits, group_size)
    layout = _cpu_layout(layer, "packed")
    if rows > cpu_packed.INT_MAX_ROWS and not native_ops().integer_gemm():
        pytest.skip(f"the {native_ops().isa()} build multiplies {rows} rows in fp32")
    assert cpu_packed.takes_integer_activations(layout, rows, native_ops())
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(7)) * torch.logspace(-2, 1, k)  # uneven sizes
    exact = _reference(layer, x)
    y = cpu_packed.linear(x, layout, layer.bias, native_ops())
    rounded = cpu_packed.rounded_activations(x, layout)
    weight = layer.dequantize().t().float()  # [K, N]
    bound = (rounded - x).abs().max(dim=0).values  # per K, the rounding actually applied (<= d / 2, checked below)
    bound = (bound[None, :] @ weight.abs()).squeeze(0)  # [N]
    assert ((y - exact).abs() <= bound + 1e-5 * float(exact.abs().max())).all()
    assert (y - exact).abs().max() > 0  # the rounding is taken: this test would see a variant that skipped it
    _check(cpu_packed.linear(x, layout, layer.bias, native_ops(), integer_activations=False), exact)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("act_order", [False, True])
def test_a_row_gives_the_same_bytes_whatever_rows_it_is_batched_with(bits, act_order):
    """With integer activations every row is rounded and summed on its own, in the same order by
    gemv_int (one row) and gemm_int (many, the AVX-512 build): a prompt's product does not depend
    on the batch it is served in, nor decode on prefill."""
    if not native_ops().integer_gemm():
        pytest.skip(f"the {native_ops().isa()} build multiplies many rows in fp32")
    k, n, group_size = 320, 200, 64
    g_idx = (torch.arange(k) // group_size)[torch.randperm(k)] if act_order else None
    layer, _ = _layer(k, n, bits, group_size, g_idx=g_idx)
    layout = _cpu_layout(layer, "packed")
    x = torch.randn(13, k)
    together = cpu_packed.linear(x, layout, layer.bias, native_ops())
    for r in (0, 6, 12):  # first, a later tile of rows, the short last tile
        assert torch.equal(cpu_packed.linear(x[r: r + 1], layout, layer.bias, native_ops()), together[r: r + 1])
    assert torch.equal(cpu_packed.linear(x[5:9], layout, layer.bias, native_ops()), together[5:9])


def test_rounded_activations_keep_fifteen_bits_per_group():
    layer, _ = _layer(256, 16, 4, 64)
    layout = _cpu_layout(layer, "packed")
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(3)) * torch.tensor([1e-3, 1.0, 1e3])[:, None]
    rounded = cpu_packed.rounded_activations(x, layout)
    eps = torch.finfo(torch.float32).eps
    for g in range(4):
        part, original = rounded[:, 64 * g: 64 * (g + 1)], x[:, 64 * g: 64 * (g + 1)]
        step = original.abs().amax(dim=1, keepdim=True) / cpu_packed.ACT_LEVELS
        q = part / step
        assert torch.allclose(q, q.round(), atol=1e-3) and q.abs().max() <= cpu_packed.ACT_LEVELS + 1e-3
        # Half a step, plus fp32's own rounding: x / d and round(x / d) * d each round to fp32, an
        # error of a few eps of |x| (up to ~1e-3 of a step at 15 bits), not a wrong rounding.
        assert ((part - original).abs() <= step / 2 + 4 * eps * original.abs()).all()


@pytest.mark.parametrize("rows", [1, cpu_packed.GEMV_MAX_ROWS + 1])
def test_activations_that_require_grad_give_the_same_product(rows):
    """A model run outside ``no_grad`` hands the kernel activations that require grad."""
    layer, _ = _layer(128, 300, 4, 32)
    layout = _cpu_layout(layer, "packed")
    x = torch.randn(rows, 128)
    y = cpu_packed.linear(x.clone().requires_grad_(), layout, layer.bias, native_ops())
    assert torch.equal(y, cpu_packed.linear(x, layout, layer.bias, native_ops()))


@pytest.mark.parametrize("integer_activations", [True, False])
@pytest.mark.parametrize("rows", [1, cpu_packed.GEMV_MAX_ROWS + 1, 64])
def test_a_model_under_inference_mode_gets_the_same_product(rows, integer_activations):
    """``torch.inference_mode`` is per thread; the kernel's worker threads write into the caller's
    output (the tiles' BLAS calls refuse an inference tensor outside that mode)."""
    layer, _ = _layer(128, 600, 3, 32)  # three tiles of columns: both threads take some
    layout = _cpu_layout(layer, "packed")
    x = torch.randn(rows, 128)
    want = cpu_packed.linear(x, layout, layer.bias, native_ops(), integer_activations=integer_activations)
    with torch.inference_mode():
        got = cpu_packed.linear(x, layout, layer.bias, native_ops(), integer_activations=integer_activations)
    assert torch.equal(got, want)


def test_integer_activations_carry_a_nan_to_every_output_of_its_row():
    layer, _ = _layer(128, 24, 4, 32)
    layout = _cpu_layout(layer, "packed")
    x = torch.randn(2, 128)
    x[0, 70] = float("nan")
    y = cpu_packed.linear(x, layout, None, native_ops())
    assert y[0].isnan().all() and y[1].isfinite().all()
