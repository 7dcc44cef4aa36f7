"""Capture sessions: per-token error signals from every ``QuantLinear`` of a model, by name.

    with CaptureSession(model, mode="error", fp_weights=fp_weights) as session:
        model(ids)
    session.records["model.layers.0.mlp.down_proj"]["err_sq"]   # fp32 [tokens]
    print(session.table())

A session attaches a :class:`LayerCapture` to each selected ``QuantLinear`` (its ``capture``
attribute) and always detaches on exit, also when the body raises.  The signals come from the
layer's own forward: on CUDA fused into the Triton kernel (``bitcliff.kernels.qmatmul``), on CPU
from the CPU path (``bitcliff.kernels.cpu``), both defined by the plain-torch reference
(``reference.CaptureMode``):

* ``"stats"``: ``sq_norm = sum(y**2)`` and ``abs_max = max|y|`` per token;
* ``"error"``: ``err_sq = ||y_q - y_fp||**2`` and ``fp_sq = ||y_fp||**2`` per token, where ``y_fp``
  uses the layer's full-precision weight from ``fp_weights`` on the *same* input (the local error
  of this layer, not the error propagated from earlier ones).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from fnmatch import fnmatch

import torch
from torch import nn

from bitcliff.kernels.reference import CaptureMode
from bitcliff.quant.qlinear import QuantLinear

Sink = Callable[[str, dict[str, torch.Tensor]], None]


@dataclass(frozen=True)
class LayerCapture:
    """What one ``QuantLinear`` captures and where it sends it (its ``capture`` attribute).

    Attributes:
        mode: ``CaptureMode.STATS`` or ``CaptureMode.ERROR`` (validated by the session).
        name: the module's name in the model, passed to ``sink``.
        sink: called once per forward with ``(name, {signal: fp32 [tokens]})``.
        weight: the full-precision ``[N, K]`` weight for ``ERROR`` (on the layer's device).
    """

    mode: CaptureMode
    name: str
    sink: Sink
    weight: torch.Tensor | None = None


class _Running:
    """Bounded-memory aggregate of one module's signals."""

    def __init__(self) -> None:
        self.tokens = 0
        self.sums: dict[str, float] = {}
        self.maxes: dict[str, float] = {}

    def add(self, signals: dict[str, torch.Tensor]) -> None:
        signals = {key: value.detach() for key, value in signals.items()}
        for key, value in signals.items():
            v = value.detach().double()
            self.sums[key] = self.sums.get(key, 0.0) + float(v.sum())
            self.maxes[key] = max(self.maxes.get(key, float("-inf")), float(v.max()) if v.numel() else float("-inf"))
        if "err_sq" in signals:
            rel = (signals["err_sq"].double() / signals["fp_sq"].double().clamp_min(1e-30)).sqrt()
            self.sums["rel_err"] = self.sums.get("rel_err", 0.0) + float(rel.sum())
            self.maxes["rel_err"] = max(self.maxes.get("rel_err", 0.0), float(rel.max()) if rel.numel() else 0.0)
        self.tokens += next(iter(signals.values())).numel()


class CaptureSession:
    """Context manager that captures per-token signals from a model's ``QuantLinear`` layers.

    Args:
        model: any module containing ``QuantLinear`` layers.
        mode: ``"stats"`` or ``"error"`` (a :class:`~bitcliff.kernels.reference.CaptureMode`).
        fp_weights: for ``"error"``, the full-precision ``[N, K]`` weight of every selected module,
            by module name (e.g. ``{name: linear.weight}`` taken before quantizing).
        modules: module names or fnmatch patterns to capture; ``None`` for all ``QuantLinear``.
        keep: ``"records"`` keeps every token's signals (``records``); ``"aggregate"`` keeps only
            running sums and maxima per module, so memory stays bounded on long runs.
    """

    def __init__(
        self,
        model: nn.Module,
        mode: CaptureMode | str = CaptureMode.STATS,
        fp_weights: dict[str, torch.Tensor] | None = None,
        modules: Iterable[str] | None = None,
        keep: str = "records",
    ) -> None:
        mode = CaptureMode.parse(mode)
        if mode is CaptureMode.NONE:
            raise ValueError("a capture session needs mode 'stats' or 'error', got 'none'")
        if keep not in ("records", "aggregate"):
            raise ValueError(f"keep must be 'records' or 'aggregate', got {keep!r}")
        self.model = model
        self.mode = mode
        self.keep = keep
        patterns = None if modules is None else tuple(modules)
        self.layers: dict[str, QuantLinear] = {
            name: module
            for name, module in model.named_modules()
            if isinstance(module, QuantLinear)
            and (patterns is None or any(name == p or fnmatch(name, p) for p in patterns))
        }
        if not self.layers:
            raise ValueError("no QuantLinear module matches the selection; nothing to capture")
        self.fp_weights = self._check_fp_weights(fp_weights or {}) if mode is CaptureMode.ERROR else {}
        self._chunks: dict[str, list[dict[str, torch.Tensor]]] = {name: [] for name in self.layers}
        self._running: dict[str, _Running] = {name: _Running() for name in self.layers}
        self._attached: list[QuantLinear] = []

    def _check_fp_weights(self, fp_weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        missing = [name for name in self.layers if name not in fp_weights]
        if missing:
            raise ValueError(f"mode 'error' needs fp_weights for every captured module; missing: {missing}")
        checked = {}
        for name, layer in self.layers.items():
            weight = fp_weights[name]
            expected = (layer.out_features, layer.in_features)
            if tuple(weight.shape) != expected:
                raise ValueError(f"fp_weights[{name!r}] has shape {tuple(weight.shape)}, expected {expected}")
            checked[name] = weight.detach()
        return checked

    # -- attaching ---------------------------------------------------------------------------

    def _sink(self, name: str, signals: dict[str, torch.Tensor]) -> None:
        if self.keep == "records":
            self._chunks[name].append({k: v.detach() for k, v in signals.items()})
        else:
            self._running[name].add(signals)

    def __enter__(self) -> "CaptureSession":
        try:
            for name, layer in self.layers.items():
                if layer.capture is not None:
                    raise RuntimeError(f"{name} is already attached to another capture session")
                weight = None
                if self.mode is CaptureMode.ERROR:
                    weight = self.fp_weights[name].to(layer.qweight.device).contiguous()
                layer.capture = LayerCapture(self.mode, name, self._sink, weight)
                self._attached.append(layer)
        except BaseException:
            self.detach()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.detach()

    def detach(self) -> None:
        """Remove this session's captures (idempotent)."""
        while self._attached:
            layer = self._attached.pop()
            if isinstance(layer.capture, LayerCapture) and layer.capture.sink == self._sink:
                layer.capture = None

    @property
    def attached(self) -> bool:
        return bool(self._attached)

    # -- results -----------------------------------------------------------------------------

    @property
    def records(self) -> dict[str, dict[str, torch.Tensor]]:
        """Per module, each signal concatenated over all captured tokens (fp32 ``[tokens]``)."""
        if self.keep != "records":
            raise ValueError("this session keeps aggregates only (keep='aggregate'); use summary()")
        out = {}
        for name, chunks in self._chunks.items():
            if chunks:
                out[name] = {key: torch.cat([c[key] for c in chunks]) for key in chunks[0]}
        return out

    def summary(self) -> list[dict[str, float | int | str]]:
        """One row per module (in model order): tokens, and mean/max of each signal.

        ``error`` sessions also give ``rel_err`` = ``sqrt(err_sq / fp_sq)`` per token (mean, max)
        and ``rel_err_total`` = ``sqrt(sum err_sq / sum fp_sq)``.
        """
        if self.keep == "records":
            running = {name: _Running() for name in self.layers}
            for name, chunks in self._chunks.items():
                for chunk in chunks:
                    running[name].add(chunk)
        else:
            running = self._running
        rows = []
        for name in self.layers:
            agg = running[name]
            row: dict[str, float | int | str] = {"module": name, "tokens": agg.tokens}
            for key in agg.sums:
                row[f"{key}_mean"] = agg.sums[key] / agg.tokens if agg.tokens else float("nan")
                row[f"{key}_max"] = agg.maxes[key]
            if "err_sq" in agg.sums:
                row["rel_err_total"] = (agg.sums["err_sq"] / max(agg.sums["fp_sq"], 1e-30)) ** 0.5
            rows.append(row)
        return rows

    def table(self) -> str:
        """:meth:`summary` as a fixed-width text table."""
        rows = self.summary()
        keys = [k for k in rows[0] if k != "module"]
        width = max(len(str(r["module"])) for r in rows)
        lines = [f"{'module':<{width}} " + " ".join(f"{k:>14}" for k in keys)]
        for r in rows:
            cells = [f"{r[k]:>14d}" if isinstance(r[k], int) else f"{r[k]:>14.4g}" for k in keys]
            lines.append(f"{r['module']:<{width}} " + " ".join(cells))
        return "\n".join(lines)
