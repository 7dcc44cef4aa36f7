"""Dequant-matmul on the CPU: the compiled kernel where it builds, a plain-torch form where not.

:func:`from_kernel_layout` gives a layer's CPU form once, and :func:`matmul` runs it, with the
capture signals of ``reference.CaptureMode``:

* :class:`~bitcliff.kernels.cpu_packed.PackedLayout`, the default: the compiled kernel
  (``cpu_kernel.cpp``, built on first use by ``cpu_build.py``) reads the packed codes;
* :class:`ByteLayout`, where no compiler is found: the plain-torch form below.

The plain-torch form.  Dequantizing the whole weight on every call (the reference) costs about
80x an fp32 matmul for a single token, since unpacking K x N codes dwarfs the K x N multiply-adds
of one row.  This form keeps, per layer, every code unpacked once to one byte (``uint8``, in the
kernel layout's group-contiguous K order, see :mod:`bitcliff.kernels.layout`) and computes

* for a few rows (decode), without forming the dense weight:
  ``y[n] = sum_g s[g, n] * (x_g . q_g[:, n]) - sum_g (sum x_g) * s[g, n] * z[g, n]``,
  one batched matmul over the groups plus two small products;
* for many rows (prefill), the dense weight ``(q - z) * s`` exactly as the reference forms it,
  then one matmul (its cost is shared by the rows).

Both equal the reference up to float32 summation order, as does the compiled kernel, except its
integer variants without a capture (decode, and every row count in a build with AVX-512 VNNI),
which first round the activations to 15 bits per group (``cpu_packed.rounded_activations`` is
their reference; on wiki the rounding moved SmolLM2's perplexity by -0.0002 %).  Within
:func:`exact_activations` the kernel keeps every product in fp32: the product with the weights
alone, as a capture measures it.  Memory:
one byte per weight beside the packed checkpoint tensors (a quarter of an fp32 copy); the compiled
kernel's layout takes about ``bits`` bits.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from bitcliff.kernels import cpu_packed
from bitcliff.kernels.cpu_build import native_ops
from bitcliff.kernels.cpu_packed import PackedLayout
from bitcliff.kernels.layout import HOST, KernelLayout
from bitcliff.kernels.reference import CaptureMode, output_stats

#: Up to this many rows the grouped form wins; above it the dense weight is formed once.
GROUPED_MAX_ROWS = 16

#: Whether the compiled kernel may round activations to integers (its default); see exact_activations.
_integer_activations = True


@contextlib.contextmanager
def exact_activations():
    """Within this block, quantized layers on the CPU multiply fp32 activations (no 15-bit
    rounding): the product with the dequantized weights up to fp32 summation order, slower.  For
    comparisons that must isolate the weights' error (a dequantized twin, a test against the
    dense weight); the model's own evaluation and serving run without it.  The setting is the
    process's, not the thread's: a forward on another thread during the block sees it too."""
    global _integer_activations
    before, _integer_activations = _integer_activations, False
    try:
        yield
    finally:
        _integer_activations = before


@dataclass(frozen=True)
class ByteLayout:
    """One linear layer's weight in the plain-torch CPU form (one byte per code).

    Attributes:
        in_features: K.
        out_features: N.
        codes: uint8 ``[G, P, N]``: group ``g``'s codes at its ``P`` positions (zero codes pad a
            short last group and the kernel layout's alignment padding).
        scales: fp32 ``[G, N]``.
        zeros: fp32 ``[G, N]`` (true, v2, zero points).
        offsets: fp32 ``[G, N]``: ``scales * zeros``.
        columns: int64 ``[G * P]``: the activation column read at each position, ``K`` (a zero
            column appended to x) for padding; None when positions are columns ``0..K-1`` then
            padding.
    """

    in_features: int
    out_features: int
    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    offsets: torch.Tensor
    columns: torch.Tensor | None

    @property
    def device(self) -> torch.device:
        return self.codes.device


def from_kernel_layout(layout: KernelLayout) -> PackedLayout | ByteLayout:
    """The CPU form of a kernel layout (exact: the same codes, scales and zeros): the compiled
    kernel's where it builds and the scales are fp16 (as ``QuantLinear`` holds them), else the
    plain-torch form."""
    if native_ops() is not None and layout.scales.dtype == torch.float16:
        return cpu_packed.pack(layout)
    return byte_layout(layout)


def byte_layout(layout: KernelLayout) -> ByteLayout:
    """The plain-torch CPU form of a kernel layout (exact: the same codes, scales and zeros)."""
    n_groups, n = layout.n_groups, layout.out_features
    slot = layout.k_padded if layout.group_size == -1 else layout.group_size
    positions = n_groups * slot
    codes = torch.zeros(positions, n, dtype=torch.uint8, device=HOST)
    codes[: layout.k_padded] = layout.codes().to(torch.uint8)
    source = torch.full((positions,), layout.in_features, dtype=torch.int64, device=HOST)
    columns = layout.source_columns()
    source[: layout.k_padded] = torch.where(columns >= 0, columns, torch.full_like(columns, layout.in_features))
    identity = bool(torch.equal(source[: layout.in_features], torch.arange(layout.in_features, device=HOST))) and bool(
        (source[layout.in_features:] == layout.in_features).all())
    scales = layout.scales.cpu().float().contiguous()
    zeros = layout.zeros.cpu().float().contiguous()
    return ByteLayout(
        in_features=layout.in_features,
        out_features=n,
        codes=codes.view(n_groups, slot, n).contiguous(),
        scales=scales,
        zeros=zeros,
        offsets=scales * zeros,
        columns=None if identity else source,
    )


#: Either CPU form, as a type and as a tuple for ``isinstance`` on the hot path.
CpuLayout = PackedLayout | ByteLayout
CPU_LAYOUTS = (PackedLayout, ByteLayout)


def _positions(x: torch.Tensor, layout: ByteLayout) -> torch.Tensor:
    """fp32 ``[M, G, P]``: the activations ``x`` ``[M, K]`` at the layout's positions."""
    n_groups, slot, _ = layout.codes.shape
    xf = x.float()
    if layout.columns is None:
        xf = torch.nn.functional.pad(xf, (0, n_groups * slot - layout.in_features))
    else:
        xf = torch.cat([xf, xf.new_zeros(xf.shape[0], 1)], dim=1)[:, layout.columns]
    return xf.view(-1, n_groups, slot)


def dense_weight(layout: CpuLayout) -> torch.Tensor:
    """fp32 ``[positions, N]``: ``(q - z) * s`` at every position (the reference's arithmetic)."""
    if isinstance(layout, PackedLayout):
        return cpu_packed.dense_weight(layout, native_ops())
    weight = (layout.codes.float() - layout.zeros[:, None, :]) * layout.scales[:, None, :]
    return weight.view(-1, layout.out_features)


def _byte_matmul(rows: torch.Tensor, layout: ByteLayout) -> torch.Tensor:
    """fp32 ``[M, N]`` for ``rows`` ``[M, K]`` in the plain-torch form."""
    xk = _positions(rows, layout)  # [M, G, P]
    if rows.shape[0] <= GROUPED_MAX_ROWS:
        per_group = torch.bmm(xk.transpose(0, 1), layout.codes.float())  # [G, M, N]
        return (per_group * layout.scales[:, None, :]).sum(dim=0) - xk.sum(dim=-1) @ layout.offsets
    return xk.reshape(rows.shape[0], -1) @ dense_weight(layout)


def matmul(
    x: torch.Tensor,
    layout: CpuLayout,
    bias: torch.Tensor | None = None,
    capture: CaptureMode = CaptureMode.NONE,
    weight_fp: torch.Tensor | None = None,
):
    """``y = x @ dequant(W)ᵀ (+ bias)`` on the CPU, with the capture signals of ``capture``.

    Args:
        x: ``[..., K]`` fp32/fp16/bf16 activations.
        layout: the weight (:func:`from_kernel_layout`).
        bias: optional ``[N]``.
        capture: which per-token signals to return beside ``y`` (see ``reference.CaptureMode``).
        weight_fp: full-precision ``[N, K]`` weight, for ``CaptureMode.ERROR``.
    Returns:
        ``y`` ``[..., N]`` in x's dtype; with a capture, ``(y, a, b)``, a and b fp32 ``[tokens]``.
    """
    packed = isinstance(layout, PackedLayout)
    if packed and capture is CaptureMode.NONE:
        # the hot path: one operator call
        return cpu_packed.linear(x, layout, bias, native_ops(), integer_activations=_integer_activations)
    lead = x.shape[:-1]
    rows = x.reshape(-1, layout.in_features)
    if packed:  # a capture measures the weights' error: the activations stay exact
        y32 = cpu_packed.linear(rows.float(), layout, bias, native_ops(), integer_activations=False)
    else:
        y32 = _byte_matmul(rows, layout)
        if bias is not None:
            y32 = y32 + bias.float()
    y = y32.to(x.dtype)
    out = y.reshape(*lead, layout.out_features)
    if capture is CaptureMode.NONE:
        return out
    if capture is CaptureMode.STATS:
        signals = output_stats(y)
    else:
        if weight_fp is None:
            raise ValueError("capture 'error' needs the full-precision weight")
        y_fp = rows.float() @ weight_fp.float().t()
        if bias is not None:
            y_fp = y_fp + bias.float()
        diff = y32 - y_fp
        signals = {"err_sq": (diff * diff).sum(dim=1), "fp_sq": (y_fp * y_fp).sum(dim=1)}
    first, second = capture.signals
    return out, signals[first], signals[second]
