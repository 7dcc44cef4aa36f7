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
    """``(figure, axes)`` like ``pyplot.subplots``, without pyplot."""
    fig = Figure(figsize=figsize)
    axes = fig.subplots(*grid)
    return fig, axes


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=96)
    return buf.getvalue()


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
    lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(lines, [ln.get_label() for ln in lines], loc="center right", fontsize=8)
    ax.set_title("Signal propagation")
    return _png(fig)


def lens_plot(signal: dict) -> bytes:
    """Logit-lens KL(FP||Q) and top-1 agreement per layer."""
    layers = np.arange(len(signal["lens_kl"]))
    fig, ax = _subplots(figsize=(7, 3.2))
    ax.semilogy(layers, np.maximum(signal["lens_kl"], 1e-6), "o-", color="tab:red", label="KL(FP||Q), nats")
    ax.set_xlabel("layer")
    ax.set_ylabel("KL (nats)")
    ax2 = ax.twinx()
    ax2.plot(layers, signal["lens_top1"], "s-", color="tab:green", label="top-1 agreement (right)")
    ax2.set_ylim(0, 1.02)
    ax2.set_ylabel("top-1 agreement")
    lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(lines, [ln.get_label() for ln in lines], loc="center left", fontsize=8)
    ax.set_title("Logit lens")
    return _png(fig)


def function_plot(components: dict) -> bytes:
    """F(c) of attention and MLP per layer (propagated and local) and gate agreement."""
    fig, axes = _subplots(1, 2, figsize=(10, 3.4))
    for run, style in (("prop", "-"), ("local", "--")):
        for c, color in (("attn", "tab:blue"), ("mlp", "tab:orange")):
            values = components["function"][run][c]
            axes[0].plot(range(len(values)), values, style, color=color, label=f"{c} ({run})")
    axes[0].axhline(0, color="k", lw=0.6)
    axes[0].axhline(1, color="k", lw=0.3, ls=":")
    axes[0].set_ylim(max(-2.0, axes[0].get_ylim()[0]), 1.05)
    axes[0].set_xlabel("layer")
    axes[0].set_ylabel("F(c)")
    axes[0].set_title("Component function (1 = as FP, 0 = mean-ablated)")
    axes[0].legend(fontsize=7)
    gates = components["gate_agreement"]
    for run, style in (("prop", "-"), ("local", "--")):
        if gates[run] is not None:
            axes[1].plot(range(len(gates[run])), gates[run], style, label=run)
    axes[1].set_ylim(0.4, 1.01)
    axes[1].set_xlabel("layer")
    axes[1].set_ylabel("sign agreement")
    axes[1].set_title("MLP gate agreement")
    axes[1].legend(fontsize=7)
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
    lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(lines, [ln.get_label() for ln in lines], fontsize=7, loc="upper left")
    rho = layer_errors.get("agreement_with_trace")
    ax.set_title("Kernel capture per layer" + ("" if rho is None else f" (Spearman vs trace {rho:.2f})"))
    return _png(fig)


def inputs_plot(inputs: dict, name: str) -> bytes:
    """Per-example damage vs the final-layer FP residual magnitude, and AUROC per layer."""
    delta = np.array(inputs["delta_nll"][name])
    magnitude = np.array([row[-1] for row in inputs["magnitude"]])
    pred = inputs["predictor"][name]
    fig, axes = _subplots(1, 2, figsize=(10, 3.4))
    axes[0].scatter(magnitude, delta, s=12)
    axes[0].set_xlabel("FP residual magnitude, last layer")
    axes[0].set_ylabel("ΔNLL (nats)")
    axes[0].set_title(f"Which inputs break (Spearman {pred['final_spearman']:.2f})")
    axes[1].plot(range(len(pred["auroc"])), pred["auroc"], "o-")
    axes[1].axhline(0.5, color="k", lw=0.6, ls=":")
    axes[1].set_ylim(0, 1)
    axes[1].set_xlabel("layer boundary")
    axes[1].set_ylabel(f"AUROC (top {inputs['top_fraction']:.0%})")
    axes[1].set_title("Residual magnitude as a predictor")
    return _png(fig)
