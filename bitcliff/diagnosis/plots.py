"""The report's figures (matplotlib, headless), each returned as PNG bytes.

Every function takes the plain dictionaries of ``DiagnosisReport.to_dict()`` so that a report can
be re-drawn from its JSON file alone.
"""

from __future__ import annotations

import io

import numpy as np

# Figures are built with matplotlib.figure.Figure, never pyplot: no global backend switch, no
# figure registry to leak into, and nothing that needs a display.
from matplotlib.figure import Figure


def _subplots(*grid: int, figsize: tuple[float, float]):
    """``(figure, axes)`` like ``pyplot.subplots``, without pyplot; constrained layout keeps the
    legends placed outside the axes (:func:`_legend`) from overlapping anything."""
    fig = Figure(figsize=figsize, layout="constrained")
    axes = fig.subplots(*grid)
    return fig, axes


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=96)
    return buf.getvalue()


def _legend(fig: Figure, *axes) -> None:
    """One legend for the lines of ``axes``, below the plot: never over the data."""
    handles, labels = [], []
    for ax in axes:
        h, lab = ax.get_legend_handles_labels()
        handles += h
        labels += lab
    fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 3), fontsize=8, frameon=False)


def _clip(ax, x, y, low: float, high: float, color: str) -> np.ndarray:
    """``y`` clipped to the axis range [low, high], with every clipped point drawn as a hollow
    triangle on the edge it passed and counted in the x-axis label (set it first), so no value
    is hidden silently and no note covers the data."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    below, above = y < low, y > high
    for mask, edge, marker in ((below, low, "v"), (above, high, "^")):
        if mask.any():
            ax.plot(x[mask], np.full(int(mask.sum()), edge), marker, mfc="none", color=color, ms=7, clip_on=False)
    clipped = int(below.sum() + above.sum())
    if clipped:
        finite = y[np.isfinite(y)]
        extreme = f"{finite.min():.3g}" if below.any() else f"{finite.max():.3g}"
        ax.set_xlabel(f"{ax.get_xlabel()}\n{clipped} point(s) beyond the axis: triangles (extreme {extreme})")
    return np.clip(y, low, high)


def signal_plot(signal: dict) -> bytes:
    """Propagated vs local relative error (log scale) and residual cosine, per layer."""
    layers = np.arange(len(signal["rel_error"]))
    fig, ax = _subplots(figsize=(7, 3.6))
    ax.semilogy(layers, signal["rel_error"], "o-", label="propagated rel. error")
    ax.semilogy(layers, signal["local_error"], "s--", label="local rel. error (FP input)")
    ax.set_xlabel("layer")
    ax.set_ylabel("relative L2 error")
    ax2 = ax.twinx()
    ax2.plot(layers, signal["cosine"], "k:", label="cosine (right)")
    ax2.set_ylabel("cosine FP vs Q")
    ax2.set_ylim(min(0.0, min(signal["cosine"])), 1.02)
    _legend(fig, ax, ax2)
    ax.set_title("Signal propagation")
    return _png(fig)


def lens_plot(signal: dict) -> bytes:
    """Logit-lens KL(FP||Q) and top-1 agreement per layer."""
    layers = np.arange(len(signal["lens_kl"]))
    fig, ax = _subplots(figsize=(7, 3.2))
    ax.set_xlabel("layer")
    ax.set_yscale("log")
    ax.set_ylim(1e-6, max(1.0, 2 * max(signal["lens_kl"])))
    kl = _clip(ax, layers, signal["lens_kl"], 1e-6, float("inf"), "tab:red")
    ax.plot(layers, kl, "o-", color="tab:red", label="KL(FP||Q), nats")
    ax.set_ylabel("KL (nats)")
    ax2 = ax.twinx()
    ax2.plot(layers, signal["lens_top1"], "s-", color="tab:green", label="top-1 agreement (right)")
    ax2.set_ylim(0, 1.02)
    ax2.set_ylabel("top-1 agreement")
    _legend(fig, ax, ax2)
    ax.set_title("Logit lens")
    return _png(fig)


def function_plot(components: dict) -> bytes:
    """F(c) of attention and MLP per layer (propagated and local) and gate agreement."""
    fig, axes = _subplots(1, 2, figsize=(10, 3.8))
    axes[0].set_xlabel("layer")
    axes[1].set_xlabel("layer")
    low = -2.0
    every = [f for run in ("prop", "local") for c in ("attn", "mlp") for f in components["function"][run][c]]
    axes[0].set_ylim(max(low, min([0.0, *[f for f in every if f == f]]) - 0.05), 1.05)
    bottom = axes[0].get_ylim()[0]
    for run, style in (("prop", "-"), ("local", "--")):
        for c, color in (("attn", "tab:blue"), ("mlp", "tab:orange")):
            values = components["function"][run][c]
            shown = _clip(axes[0], range(len(values)), values, bottom, 1.05, color)
            axes[0].plot(range(len(values)), shown, style, color=color, label=f"F {c} ({run})")
    axes[0].axhspan(bottom, 0, color="0.9", zorder=0)
    axes[0].axhline(1, color="k", lw=0.3, ls=":")
    axes[0].set_ylabel("F(c)")
    axes[0].set_title("Component function: 1 = as FP, 0 = as the block's mean output,\n"
                      "shaded F < 0 = worse than replacing the block by its mean", fontsize=10)
    gates = components["gate_agreement"]
    axes[1].set_ylim(0.4, 1.01)
    for run, style in (("prop", "-"), ("local", "--")):
        if gates[run] is not None:
            shown = _clip(axes[1], range(len(gates[run])), gates[run], 0.4, 1.01, "tab:green")
            axes[1].plot(range(len(gates[run])), shown, style, color="tab:green", label=f"gate agreement ({run})")
    axes[1].set_ylabel("sign agreement")
    axes[1].set_title("MLP gate agreement")
    _legend(fig, axes[0], axes[1])
    return _png(fig)


def attention_plot(components: dict) -> bytes:
    """Heat map of attention-pattern JS divergence, layer x head (propagated run)."""
    js = np.array(components["attention_js"]["prop"])
    fig, ax = _subplots(figsize=(7, 3.6))
    image = ax.imshow(js.T, aspect="auto", origin="lower", cmap="magma", vmin=0, vmax=max(0.05, float(js.max())))
    ax.set_xlabel("layer")
    ax.set_ylabel("head")
    ax.set_title("Attention pattern JS divergence FP vs Q (bits)")
    fig.colorbar(image, ax=ax)
    return _png(fig)


def patching_plot(patching: dict) -> bytes:
    """Heat map of recovery per (target, layer)."""
    targets = list(patching["recovery"])
    rec = np.array([[np.nan if v is None else v for v in patching["recovery"][t]] for t in targets], dtype=float)
    fig, ax = _subplots(figsize=(8, 2.4 + 0.3 * len(targets)))
    image = ax.imshow(rec, aspect="auto", cmap="RdBu", vmin=-1, vmax=1)
    ax.set_yticks(range(len(targets)), targets)
    ax.set_xlabel("layer")
    ax.set_title(f"Activation patching: recovery of {patching['damage_nats']:.3f} nats/token")
    fig.colorbar(image, ax=ax)
    return _png(fig)


def capture_plot(layer_errors: dict, signal: dict) -> bytes:
    """Per-layer error from the kernels' capture vs the trace's local error."""
    capture = [row["rel_err"] for row in layer_errors["layers"]]
    layers = np.arange(len(capture))
    fig, ax = _subplots(figsize=(7, 3.2))
    ax.bar(layers, capture, color="tab:purple", alpha=0.7, label="capture: linears' rel. error")
    ax.set_xlabel("layer")
    ax.set_ylabel("capture rel. error")
    ax2 = ax.twinx()
    ax2.plot(layers, signal["local_update_error"], "k.-", label="trace: local error / block update (right)")
    _legend(fig, ax, ax2)
    rho = layer_errors.get("agreement_with_trace")
    ax.set_title("Kernel capture per layer" + ("" if rho is None else f" (Spearman vs trace {rho:.2f})"))
    return _png(fig)


def inputs_plot(inputs: dict, name: str) -> bytes:
    """Per-example damage vs the final-layer FP residual magnitude, and AUROC per layer."""
    delta = np.array(inputs["delta_nll"][name])
    magnitude = np.array([row[-1] for row in inputs["magnitude"]])
    pred = inputs["predictor"][name]
    fig, axes = _subplots(1, 2, figsize=(10, 3.4))
    n = len(delta)
    axes[0].scatter(magnitude, delta, s=12)
    axes[0].set_xlabel("FP residual magnitude, last layer")
    axes[0].set_ylabel("ΔNLL (nats)")
    axes[0].set_title(f"Which inputs break (n = {n}, Spearman {pred['final_spearman']:.2f})")
    if pred.get("withheld"):
        axes[1].text(0.5, 0.5, "AUROC withheld:\n" + pred["withheld"].replace("; ", ";\n"),
                     ha="center", va="center", fontsize=8, wrap=True, transform=axes[1].transAxes)
        axes[1].set_axis_off()
    else:
        axes[1].plot(range(len(pred["auroc"])), pred["auroc"], "o-")
        axes[1].axhline(0.5, color="k", lw=0.6, ls=":")
        axes[1].set_ylim(0, 1)
        axes[1].set_xlabel("layer boundary")
        axes[1].set_ylabel(f"AUROC (top {inputs['top_fraction']:.0%})")
        axes[1].set_title(f"Residual magnitude as a predictor ({pred['positives']} broken of {n})")
    return _png(fig)
