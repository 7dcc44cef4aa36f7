"""The dequant-matmul kernels as torch operators, so ``torch.compile`` traces through ``QuantLinear``.

Three operators in the ``bitcliff`` namespace, all taking the weight in kernel layout
(``layout.py``; ``hi`` only for 3-bit, ``kidx`` only when reordered) and ``x [..., K]``:

* ``bitcliff::qmatmul(...) -> y [..., N]``
* ``bitcliff::qmatmul_stats(...) -> (y, sq_norm [T], abs_max [T])``
* ``bitcliff::qmatmul_error(..., weight_fp) -> (y, err_sq [T], fp_sq [T])``

with ``T = x.numel() // K`` tokens and the signals of ``reference.CaptureMode``.  CUDA tensors
run the Triton kernels (``qmatmul.py``, imported on first use so that importing this module costs
nothing and never fixes Triton's interpreter mode early); CPU tensors run the CPU path
(``cpu.py``), so the operators work everywhere.  Each has a fake (meta) implementation for tracing.

:func:`run` is the one entry point ``QuantLinear`` calls, on either device: a CUDA
:class:`KernelLayout` goes through the operators above, a :class:`~bitcliff.kernels.cpu.CpuLayout`
(the form a layer keeps on the CPU) straight to the CPU path.
"""

from __future__ import annotations

from typing import Optional

import torch

from bitcliff.kernels import cpu
from bitcliff.kernels.layout import KernelLayout
from bitcliff.kernels.reference import CaptureMode


def make_layout(
    lo: torch.Tensor,
    hi: Optional[torch.Tensor],
    scales: torch.Tensor,
    zeros: torch.Tensor,
    kidx: Optional[torch.Tensor],
    *,
    bits: int,
    group_size: int,
    in_features: int,
) -> KernelLayout:
    """Reassemble a :class:`KernelLayout` from the operator arguments."""
    return KernelLayout(
        bits=bits, in_features=in_features, out_features=scales.shape[1], group_size=group_size,
        lo=lo, hi=hi, scales=scales, zeros=zeros, kidx=kidx,
    )


def layout_args(layout: KernelLayout) -> tuple:
    """The operator arguments describing ``layout`` (the inverse of :func:`make_layout`)."""
    return (layout.lo, layout.hi, layout.scales, layout.zeros, layout.kidx,
            layout.bits, layout.group_size, layout.in_features)


def _run(x, layout: KernelLayout, bias, capture: CaptureMode, weight_fp=None):
    if x.is_cuda:
        from bitcliff.kernels.qmatmul import quant_matmul  # noqa: PLC0415 (lazy: see module doc)

        return quant_matmul(x, layout, bias, capture=capture, weight_fp=weight_fp)
    return cpu.matmul(x, cpu.from_kernel_layout(layout), bias, capture, weight_fp)


#: The operators' arguments after ``x``: the layout's tensors, the bias, the layout's constants.
_LAYOUT_SCHEMA = ("Tensor lo, Tensor? hi, Tensor scales, Tensor zeros, Tensor? kidx, Tensor? bias, "
                  "int bits, int group_size, int in_features")


def _define(capture: CaptureMode, returns: str):
    """Register ``bitcliff::<name>`` for ``capture``: one implementation and one fake (meta)
    implementation, the same for every capture mode but for the output ``returns``."""
    name = {CaptureMode.NONE: "qmatmul", CaptureMode.STATS: "qmatmul_stats", CaptureMode.ERROR: "qmatmul_error"}[capture]
    weight_fp = ", Tensor weight_fp" if capture is CaptureMode.ERROR else ""

    def implementation(x, lo, hi, scales, zeros, kidx, bias, bits, group_size, in_features, weight_fp=None):
        layout = make_layout(lo, hi, scales, zeros, kidx, bits=bits, group_size=group_size, in_features=in_features)
        return _run(x, layout, bias, capture, weight_fp)

    def fake(x, lo, hi, scales, zeros, kidx, bias, bits, group_size, in_features, weight_fp=None):
        y = x.new_empty((*x.shape[:-1], scales.shape[1]))
        if capture is CaptureMode.NONE:
            return y
        tokens = x.numel() // x.shape[-1] if x.shape[-1] else 0
        return y, x.new_empty((tokens,), dtype=torch.float32), x.new_empty((tokens,), dtype=torch.float32)

    op = torch.library.custom_op(f"bitcliff::{name}", implementation, mutates_args=(),
                                 schema=f"(Tensor x, {_LAYOUT_SCHEMA}{weight_fp}) -> {returns}")
    op.register_fake(fake)
    return op


# y [..., N]; with a capture also the two fp32 [T] signals of reference.CaptureMode (weight_fp
# [N, K] the full-precision weight, for "error").
qmatmul = _define(CaptureMode.NONE, "Tensor")
qmatmul_stats = _define(CaptureMode.STATS, "(Tensor, Tensor, Tensor)")
qmatmul_error = _define(CaptureMode.ERROR, "(Tensor, Tensor, Tensor)")


def run(
    x: torch.Tensor,
    layout: KernelLayout | cpu.CpuLayout,
    bias: torch.Tensor | None,
    capture: CaptureMode = CaptureMode.NONE,
    weight_fp: torch.Tensor | None = None,
):
    """``y`` (or ``(y, a, b)`` with a capture) for ``x`` ``[..., K]`` and a layer's weight layout.

    ``layout``: a :class:`KernelLayout` (the operators: Triton on CUDA) or a CPU layout (the CPU
    path directly).  ``capture`` must already be a :class:`CaptureMode`.
    """
    if capture is CaptureMode.ERROR and weight_fp is None:
        raise ValueError("capture 'error' needs the full-precision weight")
    if isinstance(layout, cpu.CPU_LAYOUTS):
        return cpu.matmul(x, layout, bias, capture, weight_fp)
    args = (x, *layout_args(layout)[:5], bias, *layout_args(layout)[5:])
    if capture is CaptureMode.NONE:
        return torch.ops.bitcliff.qmatmul(*args)
    if capture is CaptureMode.STATS:
        return torch.ops.bitcliff.qmatmul_stats(*args)
    return torch.ops.bitcliff.qmatmul_error(*args, weight_fp)
