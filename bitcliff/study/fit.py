"""Fit the laws of a sweep folder: ``law.json``, a printed summary, and the plots.

``law.json`` holds one :class:`bitcliff.study.law.Fit` per (stratum, method) with enough rows,
the models (size, hidden size, fp NLL per stratum: what a prediction needs) and the comparison
of memorization with utilization that the seed paper makes.
"""

from __future__ import annotations

import json
from pathlib import Path

from bitcliff.storage import write_json
from bitcliff.study.law import (
    FACTORS,
    Fit,
    LawError,
    compare_sensitivity,
    fit_law,
    size_identified,
)
from bitcliff.study.sweep import damages, read_rows

LAW_FILE = "law.json"
SEED_FACTORS = ("b_eff", "C", "N")  # the factors the seed compares the two kinds of knowledge on


def fit_folder(folder: str | Path, plots: bool = True) -> dict:
    """Fit every (stratum, method) of the sweep in ``folder``; writes ``law.json`` (and
    ``law-<method>.png``) there and returns what it wrote.

    Raises:
        LawError: no (stratum, method) has enough rows to fit.
        FileNotFoundError: ``folder`` is not a sweep folder.
    """
    folder = Path(folder)
    rows = damages(read_rows(folder))
    if not rows:
        raise LawError(f"{folder} holds no quantized rows yet: nothing to fit")
    models = {}
    for r in read_rows(folder):
        if r["method"] == "fp":
            models[r["model"]] = {"parameters": r["parameters"], "hidden_size": r["hidden_size"], "nll_fp": r["nll"],
                                  "fingerprint": r["fingerprint"]}
    strata = list(rows[0]["damage"])
    fits, skipped = {}, []
    for method in sorted({r["method"] for r in rows}):
        for stratum in strata:
            try:
                fits[f"{stratum}/{method}"] = fit_law(rows, stratum, method)
            except LawError as exc:
                skipped.append(str(exc))
    if not fits:
        raise LawError("; ".join(skipped))
    comparison = {}
    for method in sorted({f.method for f in fits.values()}):
        mem, util = fits.get(f"memorization/{method}"), fits.get(f"utilization/{method}")
        if mem and util:
            comparison[method] = {
                factor: {"memorization": mem.exponents()[factor], "utilization": util.exponents()[factor],
                         "p_memorization_more_sensitive": compare_sensitivity(mem, util, factor)}
                for factor in SEED_FACTORS if factor in mem.free and factor in util.free
            }
    law = {"models": models, "fits": {k: f.to_dict() for k, f in fits.items()}, "skipped": skipped,
           "seed_comparison": comparison, "rows": len(rows)}
    write_json(folder / LAW_FILE, law)
    if plots:
        from bitcliff.study.plots import plot_fits

        for method in sorted({f.method for f in fits.values()}):
            plot_fits(rows, [f for f in fits.values() if f.method == method], models, folder / f"law-{method}.png")
    return law


def load_law(path: str | Path) -> tuple[dict, dict[str, Fit]]:
    """``(law, fits by "stratum/method")`` from a ``law.json`` (:func:`fit_folder`)."""
    path = Path(path)
    if path.is_dir():
        path = path / LAW_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: fit a sweep first (`bitcliff study fit FOLDER`)")
    refit = "fit the sweep again with `bitcliff study fit FOLDER`"
    try:
        law = json.loads(path.read_text())
    except UnicodeDecodeError:
        raise LawError(f"{path} is not a law written by `bitcliff study fit` (not text)") from None
    except ValueError as exc:
        raise LawError(f"{path} is not JSON ({exc}); {refit}") from None
    if not isinstance(law, dict) or not isinstance(law.get("fits"), dict) or not isinstance(law.get("models"), dict):
        raise LawError(f"{path} is not a law written by `bitcliff study fit`")
    fits = {}
    for key, value in law["fits"].items():
        try:
            fits[key] = Fit(**value)
            fits[key].check()
        except (TypeError, ValueError) as exc:
            raise LawError(f"{path}: the fit {key!r} is damaged ({exc}); {refit}") from None
    for name, model in law["models"].items():
        try:
            if not (model["parameters"] > 0 and model["hidden_size"] > 0 and isinstance(model["nll_fp"], dict)):
                raise ValueError("parameters and hidden_size must be above 0")
        except (TypeError, KeyError, ValueError) as exc:
            raise LawError(f"{path}: the model {name!r} is damaged ({exc!r}); {refit}") from None
    return law, fits


def summary(law: dict, fits: dict[str, Fit]) -> list[str]:
    """The laws as text: exponents with intervals, fit quality, the most sensitive factor, and
    the comparison with the seed."""
    lines = []
    for key, fit in fits.items():
        intervals = fit.intervals()
        terms = "  ".join(f"{f}^{fit.exponents()[f]:+.2f} [{intervals[f][0]:+.2f}, {intervals[f][1]:+.2f}]"
                          for f in FACTORS if f in fit.free)
        loo = f"LOO rmse(log damage) {fit.loo_rmse:.2f}"
        if fit.loo_ppl_error is not None:
            loo += f", median ppl error {fit.loo_ppl_error:.0%}"
        size = "" if "N" not in fit.free or size_identified(fit) else "  (N barely identified: sizes within 1.5x)"
        lines.append(f"{key:>22}: damage = e^{fit.coef[0]:.2f} {terms}")
        lines.append(f"{'':>22}  R² {fit.r2:.3f}, {loo}; {fit.rows} rows ({fit.dropped} without positive damage); "
                     f"most sensitive to {fit.most_sensitive()}{size}")
    for method, factors in law["seed_comparison"].items():
        for factor, c in factors.items():
            more = c["p_memorization_more_sensitive"]
            verdict = "more" if more >= 0.9 else "less" if more <= 0.1 else "not clearly more or less"
            lines.append(f"{method}: memorization is {verdict} sensitive to {factor} than utilization "
                         f"(exponents {c['memorization']:+.2f} vs {c['utilization']:+.2f}; "
                         f"{more:.0%} of bootstrap draws larger in magnitude)")
    lines += [f"not fitted: {s}" for s in law["skipped"]]
    return lines
