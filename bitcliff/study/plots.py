"""Plots of a fitted study: measured damage against effective bits, one panel per stratum, with
the fitted law drawn through each (model, group size, calibration) series."""

from __future__ import annotations

import math
from pathlib import Path

from bitcliff.study.law import Fit, factors_of


def plot_fits(rows: list[dict], fits: list[Fit], models: dict, path: Path) -> Path:
    """Write the panels of ``fits`` (one method) to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(fits), figsize=(5 * len(fits), 4), squeeze=False)
    method = fits[0].method
    series: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["method"] == method:
            series.setdefault((r["model"], r["group_size"], r.get("calib")), []).append(r)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    markers = dict(zip(sorted({model for model, _, _ in series}), "o^sDv"))  # one marker per model
    for ax, fit in zip(axes[0], fits):
        for i, ((model, group, calib), members) in enumerate(sorted(series.items(), key=str)):
            members = sorted(members, key=lambda r: r["effective_bits"])
            label = f"{model} g{group if group and group > 0 else 'pc'}" + (f" c{calib}" if calib else "")
            color = colors[i % len(colors)]
            xs = [r["effective_bits"] for r in members]
            ys = [r["damage"][fit.stratum] for r in members]
            ax.scatter([x for x, y in zip(xs, ys) if y > 0], [y for y in ys if y > 0], color=color, s=14,
                       marker=markers.get(model, "o"), label=label)
            lo, hi = min(xs), max(xs)
            grid = [lo + (hi - lo) * k / 40 for k in range(41)]
            base = factors_of(members[0])
            ax.plot(grid, [math.exp(fit.log_damage({**base, "b_eff": x})) for x in grid], color=color, lw=1)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("effective bits per weight")
        ax.set_ylabel("damage (mean NLL increase, nats)")
        ax.set_title(f"{fit.stratum} ({method}): R² {fit.r2:.2f}")
    axes[0][-1].legend(fontsize=6, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
