"""A multiplicative power law of the quantization damage, fitted per stratum and method.

    damage = exp(c) · N^α · b_eff^β · C^γ · G^δ

with ``N`` the weights of the decoder layers' linears, ``b_eff`` the effective bits per weight
(``b + (16 + b) / G``: one fp16 scale and one ``b``-bit zero per group), ``C`` the calibration
windows (GPTQ only) and ``G`` the group size (per-channel grids count as ``G = hidden size``).
This is the form of Zhou et al. (2025), fitted here by least squares on ``log damage``.

A factor that takes one value in the rows cannot be fitted: its exponent is fixed at 0 and the
law says so.  Rows whose damage is not positive (a quantized model no worse than fp on a
stratum, within noise) have no logarithm; they are left out and counted.

Fit quality is reported three ways: R² in log space, the leave-one-configuration-out error
(every row predicted by the law fitted without it), and bootstrap intervals of the exponents
(rows resampled with replacement).  Predictions carry an interval that adds the
leave-one-out residual spread to the bootstrap spread of the fit.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np

FACTORS = ("N", "b_eff", "C", "G")
MIN_ROWS = 4  # below this many rows per (stratum, method) the fit is refused
BOOTSTRAP = 400
INTERVAL = 0.90  # central share of the intervals
FEW_SIZES = math.log(1.5)  # a log range of N below this: the size exponent is barely identified


class LawError(ValueError):
    """A law cannot be fitted or used as asked."""


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def factors_of(row: dict) -> dict[str, float]:
    """The law's factors for one sweep row (see the module docstring)."""
    g = row["group_size"] if row["group_size"] and row["group_size"] > 0 else row["hidden_size"]
    return {"N": float(row["parameters"]), "b_eff": float(row["effective_bits"]),
            "C": float(row["calib"]) if row.get("calib") else 1.0, "G": float(g)}


@dataclass
class Fit:
    """The law of one (stratum, method).

    Attributes:
        stratum, method: what it describes.
        free: the factors fitted (the others took one value and have exponent 0).
        coef: intercept then one exponent per factor of :data:`FACTORS`.
        boot: ``[BOOTSTRAP, 1 + len(FACTORS)]`` bootstrap coefficients.
        ranges: per factor, the (min, max) seen in the rows.
        r2: in log space.
        loo_rmse: leave-one-out root mean squared error of log damage.
        loo_ppl_error: for the overall stratum, the median absolute relative ppl error of the
            leave-one-out predictions (None for the others; the median, since near the cliff a
            small error in log damage is a huge one in ppl).
        rows, dropped: rows fitted, and rows left out for a damage that was not positive.
    """

    stratum: str
    method: str
    free: list[str]
    coef: list[float]
    boot: list[list[float]]
    ranges: dict[str, list[float]]
    r2: float
    loo_rmse: float
    loo_ppl_error: float | None
    rows: int
    dropped: int

    def check(self) -> None:
        """Refuse (ValueError) a fit whose numbers cannot be used: one read from a damaged or
        hand-edited ``law.json``."""
        width = 1 + len(FACTORS)
        if len(self.coef) != width or not all(_finite(c) for c in self.coef):
            raise ValueError(f"coef must be {width} finite numbers, got {self.coef!r}")
        if not self.boot or any(len(b) != width or not all(_finite(c) for c in b) for b in self.boot):
            raise ValueError(f"boot must be rows of {width} finite numbers")
        for factor in FACTORS:
            lo_hi = self.ranges.get(factor)
            if not (isinstance(lo_hi, list) and len(lo_hi) == 2 and all(_finite(v) and v > 0 for v in lo_hi)):
                raise ValueError(f"ranges[{factor!r}] must be two numbers above 0, got {lo_hi!r}")

    def exponents(self) -> dict[str, float]:
        return dict(zip(FACTORS, self.coef[1:]))

    def intervals(self) -> dict[str, list[float]]:
        boot = np.asarray(self.boot)
        lo, hi = (1 - INTERVAL) / 2, 1 - (1 - INTERVAL) / 2
        return {f: [float(np.quantile(boot[:, i + 1], lo)), float(np.quantile(boot[:, i + 1], hi))]
                for i, f in enumerate(FACTORS)}

    def effects(self) -> dict[str, float]:
        """How far each factor moves log damage across its swept range: |exponent| · log(max/min)."""
        return {f: abs(self.coef[i + 1]) * math.log(self.ranges[f][1] / self.ranges[f][0])
                for i, f in enumerate(FACTORS)}

    def most_sensitive(self) -> str:
        effects = self.effects()
        return max(effects, key=effects.get)

    def log_damage(self, factors: dict[str, float], coef=None) -> float:
        coef = self.coef if coef is None else coef
        return float(coef[0] + sum(c * math.log(factors[f]) for c, f in zip(coef[1:], FACTORS)))

    def to_dict(self) -> dict:
        return {**self.__dict__}


def _design(xs: list[dict[str, float]], free: list[str]) -> np.ndarray:
    """``[rows, 1 + len(FACTORS)]``: a column of ones, then log factors (zeros for fixed ones)."""
    return np.array([[1.0] + [math.log(x[f]) if f in free else 0.0 for f in FACTORS] for x in xs])


def _lstsq(a: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares on the non-zero columns of ``a``; exactly 0 for the others."""
    used = np.flatnonzero(np.abs(a).sum(axis=0) > 0)
    coef = np.zeros(a.shape[1])
    coef[used] = np.linalg.lstsq(a[:, used], y, rcond=None)[0]
    return coef


def fit_law(rows: list[dict], stratum: str, method: str, seed: int = 0) -> Fit:
    """Fit the law of ``stratum`` for ``method`` on the damage rows of a sweep
    (:func:`bitcliff.study.sweep.damages`).

    Raises:
        LawError: an unknown stratum, or fewer than :data:`MIN_ROWS` rows with positive damage.
    """
    chosen = [r for r in rows if r["method"] == method]
    if chosen and stratum not in chosen[0]["damage"]:
        raise LawError(f"unknown stratum {stratum!r}: the sweep measured {', '.join(chosen[0]['damage'])}")
    usable = [r for r in chosen if r["damage"][stratum] > 0]
    if len(usable) < MIN_ROWS:
        raise LawError(f"{len(usable)} {method} rows with a positive {stratum} damage: too few to fit a law "
                       f"(at least {MIN_ROWS}; sweep more configurations)")
    xs = [factors_of(r) for r in usable]
    y = np.log([r["damage"][stratum] for r in usable])
    ranges = {f: [min(x[f] for x in xs), max(x[f] for x in xs)] for f in FACTORS}
    free = [f for f in FACTORS if ranges[f][1] > ranges[f][0]]
    a = _design(xs, free)
    coef = _lstsq(a, y)
    residual = y - a @ coef
    total = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float((residual**2).sum()) / total if total > 0 else float("nan")

    loo, ppl_errors = [], []
    for i in range(len(usable)):
        keep = np.arange(len(usable)) != i
        pred = float(a[i] @ _lstsq(a[keep], y[keep]))
        loo.append(y[i] - pred)
        if stratum == "overall":
            r = usable[i]
            measured = math.exp(r["nll"]["overall"])
            predicted = math.exp(r["nll_fp"]["overall"] + math.exp(pred))
            ppl_errors.append(abs(predicted / measured - 1))
    rng = np.random.default_rng(seed)
    boot = []
    for _ in range(BOOTSTRAP):
        pick = rng.integers(0, len(usable), len(usable))
        boot.append(_lstsq(a[pick], y[pick]).tolist())
    return Fit(stratum, method, free, coef.tolist(), boot, ranges, r2,
               float(np.sqrt(np.mean(np.square(loo)))), float(np.median(ppl_errors)) if ppl_errors else None,
               len(usable), len(chosen) - len(usable))


@dataclass
class Prediction:
    """Predicted damage of one stratum (nats per token) with its interval; for ``overall`` also
    the perplexity and its interval."""

    stratum: str
    damage: float
    damage_interval: list[float]
    ppl: float | None = None
    ppl_interval: list[float] | None = None


def predict(fit: Fit, factors: dict[str, float], nll_fp: float | None = None, seed: int = 0) -> Prediction:
    """The law's prediction at ``factors``, with an interval (module docstring); ``nll_fp``: the
    model's fp NLL on the stratum, to turn an overall damage into a perplexity.  Warns
    (``UserWarning``) when a factor lies outside the range the law was fitted on."""
    outside = [f"{f}={factors[f]:g} (fitted on {lo:g}..{hi:g})" for f, (lo, hi) in fit.ranges.items()
               if f in fit.free and not lo * 0.999 <= factors[f] <= hi * 1.001]
    fixed = [f"{f}={factors[f]:g} (the sweep only had {fit.ranges[f][0]:g})" for f in FACTORS
             if f not in fit.free and abs(factors[f] - fit.ranges[f][0]) > 1e-9 * fit.ranges[f][0]]
    if outside or fixed:
        warnings.warn(f"{fit.stratum}/{fit.method}: predicting outside the fitted range: "
                      f"{'; '.join(outside + fixed)}; the interval does not cover extrapolation error",
                      UserWarning, stacklevel=2)
    centre = fit.log_damage(factors)
    rng = np.random.default_rng(seed)
    draws = np.array([fit.log_damage(factors, c) for c in fit.boot]) + rng.normal(0, fit.loo_rmse, len(fit.boot))
    lo, hi = np.quantile(draws, [(1 - INTERVAL) / 2, 1 - (1 - INTERVAL) / 2])
    damage, interval = math.exp(centre), [float(math.exp(lo)), float(math.exp(hi))]
    if fit.stratum != "overall" or nll_fp is None:
        return Prediction(fit.stratum, damage, interval)
    return Prediction(fit.stratum, damage, interval, math.exp(nll_fp + damage),
                      [math.exp(nll_fp + interval[0]), math.exp(nll_fp + interval[1])])


def compare_sensitivity(a: Fit, b: Fit, factor: str) -> float:
    """Share of bootstrap draws in which ``a``'s exponent of ``factor`` is larger in magnitude
    than ``b``'s (fits on the same rows resample the same rows, so the draws pair up)."""
    i = 1 + FACTORS.index(factor)
    pa, pb = np.abs(np.asarray(a.boot)[:, i]), np.abs(np.asarray(b.boot)[:, i])
    return float((pa > pb).mean())


def size_identified(fit: Fit) -> bool:
    """Whether the sizes in the rows span enough to fit the size exponent (a factor of 1.5)."""
    lo, hi = fit.ranges["N"]
    return math.log(hi / lo) >= FEW_SIZES
