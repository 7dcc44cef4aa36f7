"""A repaired checkpoint's corrections, as a served layer adds them to its quantized product.

A repair stores, beside the packed weights, what the codes alone cannot say
(:mod:`bitcliff.quant.repair_files`): low-rank terms ``B A`` (quantized, ``lowrank.safetensors``,
or fp16 in a PEFT adapter), sparse outliers ``S`` (``outliers.safetensors``), and a bias on a
linear that had none (bias correction, in the weights' own files).  A served layer computes

    y = x Ŵᵀ + (x Aᵀ) Bᵀ + x Sᵀ + b

with every term in fp32 and never a dense correction of ``[N, K]``.  The engine does not load
these tensors (its loader drops them, see :data:`DROPPED_BY_THE_ENGINE`; it would also drop a bias
its model has no place for): :class:`StoredCorrections` reads them from the folder, and
:func:`for_rank` cuts each to the rows and columns one tensor-parallel rank holds, which it learns
by passing index vectors through the layer's own weight loader, so that vLLM's slicing (q/k/v
heads replicated over ranks included) is never re-derived here.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from bitcliff.quant.adapter import WEIGHTS_FILE as ADAPTER_WEIGHTS
from bitcliff.quant.adapter import read_adapter
from bitcliff.quant.checkpoint import INDEX_FILE, check_files_present
from bitcliff.quant.factors import FACTORS_FILE
from bitcliff.quant.outliers import OUTLIERS_FILE, SparseOutliers
from bitcliff.quant.repair_files import read_factors, read_outliers
from bitcliff.quant.tensor_files import CheckpointError

#: Tensor names of the side files, which the engine must not load as model weights.
DROPPED_BY_THE_ENGINE = (r"\.lora_[AB]\.", r"\.outlier_(crow|col|values)$", r"^base_model\.model\.")


@dataclass(frozen=True)
class ModuleCorrection:
    """What a repair adds to one stored module's quantized product.

    Attributes:
        a, b: the low-rank term, fp32 ``A [r, K]`` and ``B [N, r]`` (fp16 values, as
            ``QuantLinear`` holds them); None without one.
        outliers: the sparse corrections of ``[N, K]``; None without them.
        bias: fp32 ``[N]`` a bias the module's engine layer has no place for; None without one.
    """

    a: torch.Tensor | None = None
    b: torch.Tensor | None = None
    outliers: SparseOutliers | None = None
    bias: torch.Tensor | None = None


class StoredCorrections:
    """The corrections of a checkpoint folder, by stored module name, read once on first use.

    Args:
        folder: the checkpoint folder (None or not a folder: no corrections).
    Raises:
        CheckpointError: a file bitcliff's manifest lists is missing, or a side file is not the
            checkpoint's own (:func:`bitcliff.quant.checkpoint.check_files_present`).
    """

    def __init__(self, folder: str | Path | None) -> None:
        self.folder = Path(folder) if folder is not None and Path(folder).is_dir() else None
        self._modules: dict[str, ModuleCorrection] | None = None
        if self.folder is not None:
            # as bitcliff.load does: a repair file missing, or another checkpoint's, is an error,
            # never a model served without its repairs or with foreign ones
            check_files_present(self.folder)

    def __getstate__(self):  # the engine sends its config to worker processes: send the folder only
        return {"folder": self.folder, "_modules": None}

    def module(self, name: str) -> ModuleCorrection | None:
        """The corrections of stored module ``name`` (``model.layers.0.self_attn.q_proj``)."""
        return self._read()[0].get(name)

    def shape(self, name: str) -> tuple[int, int]:
        """``(N, K)`` of the stored module ``name``, quantized or in full precision."""
        return self._read()[1][name]

    def _read(self) -> tuple[dict[str, ModuleCorrection], dict[str, tuple[int, int]]]:
        if self._modules is None:
            self._modules = self._read_folder() if self.folder is not None else ({}, {})
        return self._modules

    def _read_folder(self) -> tuple[dict[str, ModuleCorrection], dict[str, tuple[int, int]]]:
        shapes, biases, dense = _stored_modules(self.folder)
        parts: dict[str, dict] = {}
        shape_of = functools.partial(_shape, shapes)
        path = self.folder / FACTORS_FILE
        if path.is_file():
            for name, factors in read_factors(path, functools.partial(shape_of, path=path)).items():
                a, b = factors.dequantize()
                # held as fp16, as QuantLinear holds them: the served model is bitcliff.load's
                parts.setdefault(name, {}).update(a=a.half().float(), b=b.half().float())
        path = self.folder / ADAPTER_WEIGHTS
        if path.is_file():
            for name, (a, b) in read_adapter(self.folder).items():
                n, k = _shape(shapes, name, path=path)
                a, b = a.float(), b.float()
                if "a" in parts.get(name, {}):
                    raise CheckpointError(f"{path}: {name} also has low-rank factors in {FACTORS_FILE}; a module "
                                          "holds one low-rank term")
                if a.shape[1] != k or b.shape[0] != n or a.shape[0] != b.shape[1]:
                    raise CheckpointError(f"{path}: the factors of {name}, A {tuple(a.shape)} and B "
                                          f"{tuple(b.shape)}, do not fit its [{n}, {k}] weight")
                parts.setdefault(name, {}).update(a=a, b=b)
        path = self.folder / OUTLIERS_FILE
        if path.is_file():
            for name, outliers in read_outliers(path, functools.partial(shape_of, path=path)).items():
                parts.setdefault(name, {})["outliers"] = outliers
        for name, bias in biases.items():
            parts.setdefault(name, {})["bias"] = bias
        return {name: ModuleCorrection(**fields) for name, fields in parts.items()}, {**dense, **shapes}


def _stored_modules(folder: Path) -> tuple[dict[str, tuple[int, int]], dict[str, torch.Tensor],
                                           dict[str, tuple[int, int]]]:
    """``(N, K)`` of every quantized module of the weight files, the fp32 bias of those that have
    one, and ``(N, K)`` of every other 2-D ``weight`` (modules in full precision, embeddings)."""
    shapes, biases, dense = {}, {}, {}
    for path in _weight_files(folder):
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            for key in keys:
                if key.endswith(".scales") and f"{key[:-7]}.g_idx" in keys:
                    name = key[:-7]
                    shapes[name] = (f.get_slice(key).get_shape()[1], f.get_slice(f"{name}.g_idx").get_shape()[0])
                elif key.endswith(".weight") and len(f.get_slice(key).get_shape()) == 2:
                    dense[key[:-7]] = tuple(f.get_slice(key).get_shape())
            for name in shapes:
                if f"{name}.bias" in keys:
                    biases[name] = f.get_tensor(f"{name}.bias").float()
    return shapes, biases, dense


def _weight_files(folder: Path) -> list[Path]:
    """The checkpoint's weight files: its index's, or every ``*.safetensors`` but the side files."""
    index = folder / INDEX_FILE
    if index.is_file():
        return sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
    return sorted(p for p in folder.glob("*.safetensors") if p.name not in (FACTORS_FILE, OUTLIERS_FILE, ADAPTER_WEIGHTS))


def _shape(shapes: dict[str, tuple[int, int]], name: str, *, path: Path) -> tuple[int, int]:
    if name not in shapes:
        raise CheckpointError(f"{path}: it corrects {name}, which is not a quantized linear of the checkpoint")
    return shapes[name]


@dataclass(frozen=True)
class RankCorrection:
    """One served layer's corrections on one rank.

    Attributes:
        a: fp32 ``[R, K_rank]``, every shard's ``A`` stacked; b: fp32 ``[N_rank, R]``, each row
            reading its own shard's columns only (None, None: no low-rank term).
        outliers: fp32 sparse CSR ``[N_rank, K_rank]`` or None.
        bias: fp32 ``[N_rank]`` or None.
    """

    a: torch.Tensor | None
    b: torch.Tensor | None
    outliers: torch.Tensor | None
    bias: torch.Tensor | None

    def to(self, device: torch.device) -> "RankCorrection":
        return RankCorrection(*(None if t is None else t.to(device) for t in (self.a, self.b, self.outliers, self.bias)))

    def add_to(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``y + (x Aᵀ) Bᵀ + x Sᵀ + b``: ``x`` ``[..., K_rank]``, ``y`` ``[..., N_rank]``, in y's dtype."""
        rows = x.reshape(-1, x.shape[-1]).float()
        # One fp32 buffer for the sum (a copy of y: never y itself, which the caller may still hold),
        # the terms added in QuantLinear.forward's order.
        total = y.reshape(-1, y.shape[-1]).to(torch.float32, copy=True)
        if self.a is not None:
            total += (rows @ self.a.t()) @ self.b.t()
        if self.outliers is not None:
            total += (self.outliers @ rows.t()).t()
        if self.bias is not None:
            total += self.bias
        return total.reshape(y.shape).to(y.dtype)


def for_rank(corrections: Sequence[ModuleCorrection | None], out_sizes: Sequence[int], in_features: int,
             rows: torch.Tensor, columns: torch.Tensor, with_bias: bool) -> RankCorrection | None:
    """Cut the corrections of a layer's stored modules to one rank.

    Args:
        corrections: per fused shard, in the layer's order, its module's corrections or None.
        out_sizes: each shard's full N.
        in_features: the full K.
        rows: int64 ``[N_rank]``, the stacked output row (shard offset + row) of each of the rank's outputs.
        columns: int64 ``[K_rank]``, the input feature of each of the rank's inputs.
        with_bias: whether this rank adds the bias (a row-parallel layer's first rank only).
    Returns:
        None when no shard has a correction.
    """
    if all(c is None for c in corrections):
        return None
    offsets = torch.tensor([0, *out_sizes]).cumsum(0)
    shard_of_row = torch.bucketize(rows, offsets[1:], right=True)
    n_rank, k_rank = rows.numel(), columns.numel()
    a_parts, b = [], None
    ranks = [c.a.shape[0] if c is not None and c.a is not None else 0 for c in corrections]
    if sum(ranks):
        b = torch.zeros(n_rank, sum(ranks))
    entries = []  # (rank rows, rank cols, values) of the outliers
    bias = torch.zeros(n_rank) if with_bias and any(c is not None and c.bias is not None for c in corrections) else None
    col_of_feature = torch.full((in_features,), -1, dtype=torch.int64)
    col_of_feature[columns] = torch.arange(k_rank)
    start = 0
    for shard, correction in enumerate(corrections):
        mine = (shard_of_row == shard).nonzero().flatten()  # the rank's outputs of this shard
        local = rows[mine] - offsets[shard]
        if correction is not None and correction.a is not None:
            a_parts.append(correction.a[:, columns])
            b[mine, start:start + ranks[shard]] = correction.b[local]
        start += ranks[shard]
        if correction is not None and correction.outliers is not None:
            out_row, in_col = correction.outliers.coordinates()
            row_of_local = torch.full((correction.outliers.shape[0],), -1, dtype=torch.int64)
            row_of_local[local] = mine
            r, c = row_of_local[out_row], col_of_feature[in_col]
            kept = (r >= 0) & (c >= 0)
            entries.append((r[kept], c[kept], correction.outliers.values.float()[kept]))
        if bias is not None and correction is not None and correction.bias is not None:
            bias[mine] = correction.bias[local]
    a = torch.cat(a_parts) if a_parts else None
    outliers = None
    if entries:
        r, c, v = (torch.cat(parts) for parts in zip(*entries))
        outliers = SparseOutliers.from_entries(r, c, v, (n_rank, k_rank)).sparse(torch.float32)
    return RankCorrection(a, b, outliers, bias)
