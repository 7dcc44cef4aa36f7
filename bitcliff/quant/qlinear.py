"""QuantLinear: a drop-in replacement for ``nn.Linear`` holding GPTQ-packed weights."""

from __future__ import annotations

import torch
from torch import nn

from bitcliff.kernels import cpu
from bitcliff.kernels import ops as kernel_ops
from bitcliff.kernels.layout import KernelLayout, from_gptq
from bitcliff.kernels.pack import SUPPORTED_BITS, packed_length
from bitcliff.kernels.reference import dequantize
from bitcliff.quant.qweight import QuantizedWeight


class QuantLinear(nn.Module):
    """``y = x @ dequant(W)ᵀ + b`` with W stored as GPTQ tensors.

    Buffers (the checkpoint's tensor names):
        qweight: int32 ``[K*bits/32, N]``, codes packed along K.
        qzeros: int32 ``[n_groups, N*bits/32]``, true (v2) zero points packed along N.
        scales: fp16 ``[n_groups, N]``.
        g_idx: int32 ``[K]``.
        bias: optional ``[N]`` (fp16 in checkpoints, any float dtype in memory).

    The forward accepts ``[..., K]`` fp16/bf16/fp32 activations and returns ``[..., N]`` in the
    activation dtype, through :func:`bitcliff.kernels.ops.run` on the layout for the input's
    device: on CUDA the Triton kernel's layout (``bitcliff::qmatmul``), on the CPU the CPU path's
    (one byte per code, :mod:`bitcliff.kernels.cpu`).  The layout is built from the buffers on
    first use and rebuilt whenever a buffer is replaced or written in place.

    ``capture``: ``None``, or an object with ``mode`` (a ``CaptureMode``), ``weight`` (the
    full-precision ``[N, K]`` weight, for ``ERROR``), ``name`` and ``sink``; each forward then
    calls ``sink(name, signals)`` with the per-token fp32 signals of the mode.  Set by
    ``bitcliff.diagnosis.capture.CaptureSession``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        n_groups: int,
        bias: bool = False,
        name: str = "",
    ) -> None:
        super().__init__()
        if bits not in SUPPORTED_BITS:
            raise ValueError(f"{name or 'QuantLinear'}: bits must be one of {SUPPORTED_BITS}, got {bits}")
        if in_features <= 0 or out_features <= 0 or n_groups <= 0:
            raise ValueError(
                f"{name or 'QuantLinear'}: sizes must be positive, got in_features={in_features}, "
                f"out_features={out_features}, n_groups={n_groups}"
            )
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        self.group_size = group_size
        self.name = name
        self.register_buffer(
            "qweight", torch.zeros(packed_length(in_features, bits), out_features, dtype=torch.int32)
        )
        self.register_buffer(
            "qzeros", torch.zeros(n_groups, packed_length(out_features, bits), dtype=torch.int32)
        )
        self.register_buffer("scales", torch.ones(n_groups, out_features, dtype=torch.float16))
        self.register_buffer("g_idx", torch.zeros(in_features, dtype=torch.int32))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float16))
        else:
            self.bias = None
        self.capture = None
        self._layout: KernelLayout | cpu.CpuLayout | None = None
        self._layout_key: tuple | None = None

    @property
    def n_groups(self) -> int:
        return self.scales.shape[0]

    @classmethod
    def from_quantized(
        cls,
        qw: QuantizedWeight,
        group_size: int,
        bias: torch.Tensor | None = None,
        name: str = "",
    ) -> "QuantLinear":
        """Build from a :class:`QuantizedWeight` (and the original layer's bias)."""
        in_features, out_features = qw.codes.shape
        layer = cls(in_features, out_features, qw.bits, group_size, qw.scales.shape[0], bias is not None, name)
        for key, value in qw.packed().items():
            getattr(layer, key).copy_(value)
        if bias is not None:
            layer.bias = bias.detach().clone()
        return layer

    def load_packed(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy checkpoint tensors in, checking every shape and dtype against this layer."""
        for key in ("qweight", "qzeros", "scales", "g_idx"):
            if key not in tensors:
                raise ValueError(f"{self.name}: checkpoint is missing {self.name}.{key}")
            have, want = tensors[key], getattr(self, key)
            if tuple(have.shape) != tuple(want.shape):
                raise ValueError(
                    f"{self.name}.{key}: checkpoint shape {tuple(have.shape)} does not match "
                    f"{tuple(want.shape)} expected for bits={self.bits}, group_size={self.group_size}, "
                    f"in_features={self.in_features}, out_features={self.out_features}"
                )
            want.copy_(have.to(want.dtype))
        if int(self.g_idx.min()) < 0 or int(self.g_idx.max()) >= self.n_groups:
            raise ValueError(f"{self.name}.g_idx holds group indices outside [0, {self.n_groups})")
        if "bias" in tensors:
            self.bias = tensors["bias"].clone()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dense ``[N, K]`` weight in ``dtype``."""
        return dequantize(self.qweight, self.qzeros, self.scales, self.g_idx, self.bits, dtype)

    def _buffers_key(self) -> tuple:
        tensors = (self.qweight, self.qzeros, self.scales, self.g_idx)
        return tuple((t.device, t.data_ptr(), t._version) for t in tensors)

    def _build_layout(self) -> KernelLayout | cpu.CpuLayout:
        layout = from_gptq(self.qweight, self.qzeros, self.scales, self.g_idx, self.bits)
        self._layout = cpu.from_kernel_layout(layout) if self.qweight.device.type == "cpu" else layout
        self._layout_key = self._buffers_key()
        return self._layout

    def kernel_layout(self) -> KernelLayout | cpu.CpuLayout:
        """The layout the dequant-matmul reads on the buffers' device, cached: the Triton kernels'
        (``bitcliff.kernels.layout``) on CUDA, the CPU path's (``bitcliff.kernels.cpu``) on the CPU."""
        layout = self._layout
        if torch.compiler.is_compiling():
            if layout is not None:
                return layout  # compiled inference: weights are frozen, skip the host-side check
            # Built outside the graph (one graph break); run a forward eagerly first to avoid it.
            return torch.compiler.disable(self._build_layout)()
        if layout is None or self._layout_key != self._buffers_key():
            layout = self._build_layout()
        return layout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"{self.name or 'QuantLinear'}: input has {x.shape[-1]} features, expected {self.in_features}"
            )
        capture = self.capture
        if capture is None:
            return kernel_ops.run(x, self.kernel_layout(), self.bias)
        y, a, b = kernel_ops.run(x, self.kernel_layout(), self.bias, capture.mode, capture.weight)
        first, second = capture.mode.signals
        capture.sink(capture.name, {first: a, second: b})
        return y

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, bias={self.bias is not None}"
        )
