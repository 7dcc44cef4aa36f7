"""Sparse outliers: exact fp16 corrections to a few weights of a quantized layer, stored as CSR.

SpQR's and SqueezeLLM's dense-and-sparse split: most weights live on the low-bit grid, a few
whose rounding costs most at the layer's output are kept exact by storing
``c = w − dequant(q)`` for them.  The layer computes ``y = x Ŵᵀ + x Sᵀ`` with ``S`` the sparse
``[N, K]`` matrix of corrections.

Format (per layer, row-compressed, rows = output features): ``crow`` int32 ``[N + 1]``,
``col`` int16 ``[nnz]`` (int32 when ``K`` > 32767), ``values`` fp16 ``[nnz]``.  A correction
costs 32 bits (16 of value, 16 of column) plus 32 bits per row for the row pointers.  Why
CSR: at the densities a fraction of a bit buys (0.25 bits per weight is 0.8 % of the weights
at 32 bits each) a bitmap would cost 1 bit per weight alone, and coordinate lists 2 indices
per entry; CSR is one index per entry and what ``torch.sparse`` multiplies directly.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

#: The file beside a checkpoint's weights that holds its layers' outliers.
OUTLIERS_FILE = "outliers.safetensors"

#: Stored bits of one correction (fp16 value + int16 column), and of one row pointer.
ENTRY_BITS = 32
ROW_POINTER_BITS = 32


@dataclass
class SparseOutliers:
    """Exact corrections of a few weights of one ``[N, K]`` layer (module docstring).

    Attributes:
        crow: int32 ``[N + 1]`` row pointers.
        col: int16 or int32 ``[nnz]`` input-feature index of each correction.
        values: fp16 ``[nnz]`` corrections ``w − dequant(q)``.
        shape: ``(N, K)``.
    """

    crow: torch.Tensor
    col: torch.Tensor
    values: torch.Tensor
    shape: tuple[int, int]

    def __post_init__(self) -> None:
        n, k = self.shape
        nnz = self.values.numel()
        if self.crow.shape != (n + 1,) or self.col.shape != (nnz,):
            raise ValueError(f"sparse outliers of a [{n}, {k}] layer need crow [{n + 1}] and col [{nnz}], got "
                             f"{tuple(self.crow.shape)} and {tuple(self.col.shape)}")
        if nnz and (int(self.crow[-1]) != nnz or int(self.crow[0]) != 0 or bool((self.crow.diff() < 0).any())):
            raise ValueError("sparse outliers: crow must rise from 0 to the number of corrections")
        if nnz and (int(self.col.min()) < 0 or int(self.col.max()) >= k):
            raise ValueError(f"sparse outliers: a column index lies outside [0, {k})")
        if not bool(torch.isfinite(self.values).all()):
            raise ValueError("sparse outliers hold NaN or Inf corrections")

    @classmethod
    def from_entries(cls, rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor,
                     shape: tuple[int, int]) -> "SparseOutliers":
        """From coordinate entries (int64 ``rows``, ``cols``; float ``values``, each ``[nnz]``)."""
        n, k = shape
        order = torch.argsort(rows * k + cols)
        rows, cols = rows[order], cols[order]
        counts = torch.bincount(rows, minlength=n)
        crow = torch.zeros(n + 1, dtype=torch.int32, device=rows.device)
        crow[1:] = torch.cumsum(counts, 0)
        index_dtype = torch.int16 if k <= torch.iinfo(torch.int16).max else torch.int32
        return cls(crow, cols.to(index_dtype), values[order].to(torch.float16), (n, k))

    @property
    def nnz(self) -> int:
        return self.values.numel()

    def coordinates(self) -> tuple[torch.Tensor, torch.Tensor]:
        """int64 ``rows`` and ``cols`` ``[nnz]`` of the corrections, in storage order."""
        rows = torch.repeat_interleave(torch.arange(self.shape[0], device=self.crow.device), self.crow.diff().long())
        return rows, self.col.long()

    def split_rows(self, sizes: list[int]) -> list["SparseOutliers"]:
        """The corrections of consecutive row blocks of ``sizes`` rows (a stacked group's members)."""
        if sum(sizes) != self.shape[0]:
            raise ValueError(f"row blocks {sizes} do not add up to {self.shape[0]} rows")
        parts, start = [], 0
        for n in sizes:
            first, last = int(self.crow[start]), int(self.crow[start + n])
            parts.append(SparseOutliers(self.crow[start:start + n + 1] - first, self.col[first:last],
                                        self.values[first:last], (n, self.shape[1])))
            start += n
        return parts

    def bits(self) -> int:
        """Stored bits: each correction and each row pointer."""
        entry = ENTRY_BITS if self.col.dtype == torch.int16 else ENTRY_BITS + 16
        return self.nnz * entry + self.crow.numel() * ROW_POINTER_BITS

    def dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The corrections as a dense ``[N, K]`` matrix."""
        return self.sparse(dtype).to_dense()

    def sparse(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A ``torch.sparse_csr`` ``[N, K]`` tensor of the corrections in ``dtype``."""
        with warnings.catch_warnings():  # "CSR support is in beta": its matmul is what we use, and tested
            warnings.simplefilter("ignore", UserWarning)
            return torch.sparse_csr_tensor(self.crow.long(), self.col.long(), self.values.to(dtype), self.shape,
                                           device=self.values.device,  # not the default device
                                           check_invariants=False)  # checked when constructed

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """The stored tensors, named ``{prefix}.outlier_crow`` / ``_col`` / ``_values``."""
        return {f"{prefix}.outlier_crow": self.crow.contiguous(), f"{prefix}.outlier_col": self.col.contiguous(),
                f"{prefix}.outlier_values": self.values.contiguous()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], prefix: str, shape: tuple[int, int]) -> "SparseOutliers":
        return cls(tensors[f"{prefix}.outlier_crow"], tensors[f"{prefix}.outlier_col"],
                   tensors[f"{prefix}.outlier_values"], shape)

    def to(self, device) -> "SparseOutliers":
        return SparseOutliers(self.crow.to(device), self.col.to(device), self.values.to(device), self.shape)


def outlier_budget(bits: float, n_rows: int | list[int], index_bits: int = 16) -> int:
    """How many corrections ``bits`` buy in an ``n_rows``-row layer (or several layers of these
    row counts, each with its own CSR), their row pointers paid first."""
    pointers = sum(n + 1 for n in ([n_rows] if isinstance(n_rows, int) else n_rows)) * ROW_POINTER_BITS
    return max(0, int((bits - pointers) // (16 + index_bits)))
