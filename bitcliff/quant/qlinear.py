"""QuantLinear: a drop-in replacement for ``nn.Linear`` holding GPTQ-packed weights."""

from __future__ import annotations

import torch
from torch import nn

from bitcliff.kernels import cpu
from bitcliff.kernels import ops as kernel_ops
from bitcliff.kernels.layout import KernelLayout, from_gptq
from bitcliff.kernels.pack import SUPPORTED_BITS, packed_length
from bitcliff.kernels.reference import dequantize
from bitcliff.quant.factors import QuantizedFactors
from bitcliff.quant.outliers import SparseOutliers
from bitcliff.quant.qweight import QuantizedWeight


_OUTLIER_BUFFERS = ("outlier_crow", "outlier_col", "outlier_values")


class QuantLinear(nn.Module):
    """``y = x @ dequant(W)ᵀ + b`` with W stored as GPTQ tensors.

    Buffers (the checkpoint's tensor names):
        qweight: int32 ``[K*bits/32, N]``, codes packed along K.
        qzeros: int32 ``[n_groups, N*bits/32]``, true (v2) zero points packed along N.
        scales: fp16 ``[n_groups, N]``.
        g_idx: int32 ``[K]``.
        bias: optional ``[N]`` (fp16 in checkpoints, any float dtype in memory).
        lora_A, lora_B: optional low-rank error compensation, fp16 ``[r, K]`` and ``[N, r]``
            (``bitcliff.repairs.lowrank``): the forward adds ``(x @ lora_Aᵀ) @ lora_Bᵀ``.  Stored
            beside a checkpoint as a PEFT LoRA adapter, not among its tensors; or, when
            ``lowrank_factors`` holds their quantized form (``bitcliff.quant.factors``), in
            ``lowrank.safetensors`` (``lora_A``/``lora_B`` are then its dequantization).
        outlier_crow, outlier_col, outlier_values: optional sparse exact corrections of a few
            weights (``bitcliff.quant.outliers``, CSR ``[N, K]``): the forward adds ``x @ Sᵀ``.
            Stored beside a checkpoint in ``outliers.safetensors``.

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
        *,
        bias: bool = False,
        name: str = "",
        device: torch.device | str | None = None,
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
        on = {"device": device}  # None: torch's default device, as for nn.Linear
        self.register_buffer(
            "qweight", torch.zeros(packed_length(in_features, bits), out_features, dtype=torch.int32, **on)
        )
        self.register_buffer(
            "qzeros", torch.zeros(n_groups, packed_length(out_features, bits), dtype=torch.int32, **on)
        )
        self.register_buffer("scales", torch.ones(n_groups, out_features, dtype=torch.float16, **on))
        self.register_buffer("g_idx", torch.zeros(in_features, dtype=torch.int32, **on))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float16, **on))
        else:
            self.bias = None
        self.lora_A: torch.Tensor | None = None
        self.lora_B: torch.Tensor | None = None
        self.lowrank_factors: QuantizedFactors | None = None  # see set_lowrank
        self.outlier_crow = self.outlier_col = self.outlier_values = None  # see set_outliers
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
        """Build from a :class:`QuantizedWeight` (and the original layer's bias), on its device."""
        in_features, out_features = qw.codes.shape
        layer = cls(in_features, out_features, qw.bits, group_size, qw.scales.shape[0], bias=bias is not None,
                    name=name, device=qw.codes.device)
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
            self.set_bias(tensors["bias"].clone())

    def set_bias(self, bias: torch.Tensor | None) -> None:
        """Set (or, with None, remove) the ``[N]`` bias, as a buffer that follows ``.to()``."""
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            raise ValueError(f"{self.name}: bias of shape {tuple(bias.shape)}, expected ({self.out_features},)")
        self._buffers.pop("bias", None)
        self.__dict__.pop("bias", None)
        if bias is None:
            self.bias = None
        else:
            self.register_buffer("bias", bias)

    @property
    def rank(self) -> int:
        """Rank of the low-rank compensation (0 without one)."""
        return 0 if self.lora_A is None else self.lora_A.shape[0]

    def set_lowrank(self, a: torch.Tensor | None, b: torch.Tensor | None,
                    quantized: QuantizedFactors | None = None) -> None:
        """Set the low-rank term ``B @ A`` (``a`` ``[r, K]``, ``b`` ``[N, r]``, held as fp16), or
        remove it with ``None``.  ``quantized``: the factors' stored form when they are quantized
        (``a`` and ``b`` are then its dequantization; :meth:`set_quantized_lowrank`).  Raises
        ``ValueError`` naming the layer on a shape mismatch."""
        for key in ("lora_A", "lora_B"):
            self._buffers.pop(key, None)
            self.__dict__.pop(key, None)
        self.lowrank_factors = None
        if a is None or b is None:
            if (a is None) != (b is None):
                raise ValueError(f"{self.name}: a low-rank term needs both factors")
            self.lora_A = self.lora_B = None
            return
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != self.in_features or b.shape[0] != self.out_features \
                or a.shape[0] != b.shape[1] or a.shape[0] < 1:
            raise ValueError(
                f"{self.name}: low-rank factors of shapes A {tuple(a.shape)}, B {tuple(b.shape)} do not fit a "
                f"[{self.out_features}, {self.in_features}] layer (expected A [r, {self.in_features}], "
                f"B [{self.out_features}, r])"
            )
        if a.shape[0] >= min(self.in_features, self.out_features):
            raise ValueError(f"{self.name}: rank {a.shape[0]} must be below min(K, N) = "
                             f"{min(self.in_features, self.out_features)}")
        self.register_buffer("lora_A", a.detach().to(torch.float16).contiguous())
        self.register_buffer("lora_B", b.detach().to(torch.float16).contiguous())
        if quantized is not None:
            if quantized.shape != (self.out_features, self.in_features) or quantized.rank != a.shape[0]:
                raise ValueError(f"{self.name}: quantized low-rank factors of rank {quantized.rank} for a "
                                 f"{list(quantized.shape)} layer do not fit this rank-{a.shape[0]} "
                                 f"[{self.out_features}, {self.in_features}] term")
            self.lowrank_factors = quantized

    def set_quantized_lowrank(self, factors: QuantizedFactors) -> None:
        """Set the low-rank term from quantized factors (held dequantized, stored quantized)."""
        self.set_lowrank(*factors.dequantize(), quantized=factors)

    def set_outliers(self, outliers: SparseOutliers | None) -> None:
        """Set the sparse exact corrections (``outliers`` of this layer's ``[N, K]`` shape), or
        remove them with ``None``.  Raises ``ValueError`` naming the layer on a shape mismatch."""
        for key in _OUTLIER_BUFFERS:
            self._buffers.pop(key, None)
            self.__dict__.pop(key, None)
        if outliers is None:
            for key in _OUTLIER_BUFFERS:
                setattr(self, key, None)
            return
        if tuple(outliers.shape) != (self.out_features, self.in_features):
            raise ValueError(f"{self.name}: sparse outliers of shape {tuple(outliers.shape)} do not fit a "
                             f"[{self.out_features}, {self.in_features}] layer")
        device = self.qweight.device
        self.register_buffer("outlier_crow", outliers.crow.to(device))
        self.register_buffer("outlier_col", outliers.col.to(device))
        self.register_buffer("outlier_values", outliers.values.to(device, torch.float16))

    def outliers(self) -> SparseOutliers | None:
        """The sparse exact corrections, or None."""
        if self.outlier_values is None:
            return None
        return SparseOutliers(self.outlier_crow, self.outlier_col, self.outlier_values,
                              (self.out_features, self.in_features))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dense ``[N, K]`` quantized weight in ``dtype`` (without a low-rank term)."""
        return dequantize(self.qweight, self.qzeros, self.scales, self.g_idx, self.bits, dtype)

    def effective_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dense ``[N, K]`` weight the layer applies: the quantized weight plus ``B @ A``."""
        weight = self.dequantize(torch.float32)
        if self.lora_A is not None:
            weight = weight + self.lora_B.float() @ self.lora_A.float()
        if self.outlier_values is not None:
            weight = weight + self.outliers().dense()
        return weight.to(dtype)

    def _buffers_key(self) -> tuple:
        # Storage address and in-place version of each buffer: a replaced buffer (or one moved to
        # another device) has another address, one written in place another version.  Checked on
        # every forward, so kept to two cheap calls per tensor.
        tensors = (self.qweight, self.qzeros, self.scales, self.g_idx)
        return tuple((t.data_ptr(), t._version) for t in tensors)

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
            y = kernel_ops.run(x, self.kernel_layout(), self.bias)
        else:  # the capture measures the quantized weight alone, before any low-rank term
            y, a, b = kernel_ops.run(x, self.kernel_layout(), self.bias, capture.mode, capture.weight)
            first, second = capture.mode.signals
            capture.sink(capture.name, {first: a, second: b})
        if self.lora_A is not None:
            # fp32 for the two thin products: the term corrects errors far below fp16 resolution of y
            y = y + ((x.float() @ self.lora_A.float().t()) @ self.lora_B.float().t()).to(y.dtype)
        if self.outlier_values is not None:  # S @ xᵀ, CSR times dense: torch.sparse on CPU and CUDA
            rows = x.reshape(-1, self.in_features).float()
            y = y + (self._sparse_outliers() @ rows.t()).t().reshape(y.shape).to(y.dtype)
        return y

    def _sparse_outliers(self) -> torch.Tensor:
        """The fp32 CSR tensor of the outliers, built once per set of buffers (checked then)."""
        key = tuple((t.device, t.data_ptr(), t._version) for t in
                    (self.outlier_crow, self.outlier_col, self.outlier_values))
        if getattr(self, "_sparse_key", None) != key:
            self._sparse = self.outliers().sparse(torch.float32)
            self._sparse_key = key
        return self._sparse

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, bias={self.bias is not None}"
            + (f", rank={self.rank}" if self.rank else "")
            + (f", outliers={self.outlier_values.numel()}" if self.outlier_values is not None else "")
        )
