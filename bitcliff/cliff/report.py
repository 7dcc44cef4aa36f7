"""The cliff run as a printed table and one self-contained HTML page.

The page holds the cliff plot (log perplexity against effective bits per weight: RTN, GPTQ and
repaired GPTQ, the last at its bits plus the repair's), one card per width (the verdict, its
strongest evidence, the signal-propagation plot, a link to that width's full diagnosis report),
the repair plans and the continuations.  Figures are embedded as PNG; nothing is fetched.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from matplotlib.figure import Figure

from bitcliff.divergence import kl_recovery
from bitcliff.storage import write_text


def _kl_recovery(width: dict) -> float:
    return kl_recovery(width["gptq"]["kl_mean"], width["repair"]["kl_mean"])


def table(summary: dict) -> str:
    """The printed table: one row per width (a second row, where measured, with each model's
    mean KL divergence from full precision in nats, the repair's recovery of it, and the same-top-
    token agreement of RTN / GPTQ / repaired), and the continuations."""
    fp = summary["fp"]["ppl"]
    lines = [f"{summary['model']}: fp ppl {fp:.2f} ({summary['settings']['windows']} windows x 512 tokens of "
             f"{summary['settings']['text']})",
             f"{'bits':>4} {'eff.':>5} {'RTN':>10} {'GPTQ':>10} {'repaired':>10} {'+bits':>6} {'recovery':>8}  verdict"]
    for w in summary["widths"]:
        rep = w["repair"]
        lines.append(f"{w['bits']:>4} {w['effective_bits']:5.2f} {w['rtn']['ppl']:10.2f} {w['gptq']['ppl']:10.2f} "
                     f"{rep['ppl']:10.2f} {rep['bits_spent']:6.3f} {rep['recovery']:8.0%}  "
                     f"{w['diagnosis']['headline'].removeprefix('verdict: ')}")
        if all("kl_mean" in w[key] for key in ("rtn", "gptq", "repair")):  # runs before KL was measured lack it
            lines.append(f"{'':>4} {'KL':>5} {w['rtn']['kl_mean']:10.4f} {w['gptq']['kl_mean']:10.4f} "
                         f"{rep['kl_mean']:10.4f} {'':>6} {_kl_recovery(w):8.0%}  same top token: "
                         f"{w['rtn']['same_top_pct']:.1f} / {w['gptq']['same_top_pct']:.1f} / "
                         f"{rep['same_top_pct']:.1f} %")
        if w["diagnosis"]["evidence"]:
            lines.append(f"{'':>30}evidence: {w['diagnosis']['evidence'][0]}")
    cont = summary["continuations"]
    lines.append(f"\ncontinuations of \"{cont['prompt']}\" (greedy):")
    for name, text in cont["texts"].items():
        lines.append(f"  {name:>12}: {' '.join(text.split())}")
    return "\n".join(lines)


def _png(fig: Figure) -> str:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=96)
    return base64.b64encode(buf.getvalue()).decode()


def cliff_plot(summary: dict) -> str:
    """Base64 PNG: log perplexity against effective bits per weight."""
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.subplots()
    widths = sorted(summary["widths"], key=lambda w: w["effective_bits"])
    x = [w["effective_bits"] for w in widths]
    ax.plot(x, [w["rtn"]["ppl"] for w in widths], "s--", color="tab:gray", label="RTN")
    ax.plot(x, [w["gptq"]["ppl"] for w in widths], "o-", color="tab:blue", label="GPTQ")
    ax.plot([w["effective_bits"] + w["repair"]["bits_spent"] for w in widths], [w["repair"]["ppl"] for w in widths],
            "^-", color="tab:green", label=f"GPTQ + repair (+{summary['settings']['budget']:g} bits at most)")
    ax.axhline(summary["fp"]["ppl"], color="k", lw=0.8, ls=":", label="full precision")
    ax.set_yscale("log")
    ax.set_xlabel("effective bits per weight (codes + scales + zero points + repair)")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_title("The cliff")
    fig.legend(loc="outside lower center", ncols=4, fontsize=8, frameon=False)
    return _png(fig)


def _card(width: dict, folder: Path) -> str:
    from bitcliff.diagnosis import plots

    esc = html.escape
    diag = width["diagnosis"]
    label = diag["label"]
    signal_png = ""
    report = folder / diag["report"]
    data_path = report.parent / "diagnosis.json"
    if data_path.is_file():
        signal = json.loads(data_path.read_text())["signal"]
        signal_png = (f"<img alt='signal propagation, W{width['bits']}' "
                      f"src='data:image/png;base64,{base64.b64encode(plots.signal_plot(signal)).decode()}'>")
    rep = width["repair"]
    return (f"<section class='card {esc(label)}' id='w{width['bits']}'><h2>W{width['bits']} "
            f"({width['effective_bits']:.2f} bits per weight)</h2>"
            f"<p class='verdict'>{esc(diag['headline'])}</p><ul>"
            + "".join(f"<li>{esc(e)}</li>" for e in diag["evidence"])
            + f"</ul><p>ppl RTN {width['rtn']['ppl']:.2f}, GPTQ {width['gptq']['ppl']:.2f}, repaired "
            f"{rep['ppl']:.2f} with {rep['bits_spent']:.3f} extra bits per weight "
            f"({rep['recovery']:.0%} of the gap to full precision recovered).</p>"
            + "<p><b>Repair plan:</b></p><ul>" + "".join(f"<li>{esc(r)}</li>" for r in rep["reasons"]) + "</ul>"
            + signal_png
            + f"<p><a href='{esc(diag['report'])}'>the full diagnosis report</a></p></section>")


_STYLE = """
body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.5em} h2{font-size:1.15em}
.card{border:1px solid #ccc;border-radius:6px;padding:.6em 1em;margin:1em 0}
.collapse .verdict{background:#fde2e1}.degradation .verdict{background:#fff4d6}
.healthy .verdict{background:#e3f6e3}.mixed .verdict{background:#e8e8f8}
.verdict{font-weight:bold;padding:.4em}
table{border-collapse:collapse;font-size:.9em} td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}
img{max-width:100%} blockquote{margin:.3em 0 .3em 1em;color:#333}
"""


def _divergence_cells(width: dict) -> str:
    """The KL and same-top cells of a width's row (empty where the run did not measure them)."""
    models = [width[key] for key in ("rtn", "gptq", "repair")]
    if not all("kl_mean" in m for m in models):
        return "<td></td><td></td><td></td>"
    kl = " / ".join(format(m["kl_mean"], ".4f") for m in models)
    same_top = " / ".join(format(m["same_top_pct"], ".1f") for m in models)
    return f"<td>{kl}</td><td>{_kl_recovery(width):.0%}</td><td>{same_top}</td>"


def render(summary: dict, folder: Path) -> str:
    esc = html.escape
    fp = summary["fp"]["ppl"]
    rows = "".join(
        f"<tr><td>W{w['bits']}</td><td>{w['effective_bits']:.2f}</td><td>{w['rtn']['ppl']:.2f}</td>"
        f"<td>{w['gptq']['ppl']:.2f}</td><td>{w['repair']['ppl']:.2f}</td><td>{w['repair']['bits_spent']:.3f}</td>"
        f"<td>{w['repair']['recovery']:.0%}</td>{_divergence_cells(w)}"
        f"<td style='text-align:left'>{esc(w['diagnosis']['label'])}</td></tr>"
        for w in summary["widths"] if all(k in w for k in ("rtn", "gptq", "repair")))
    cont = summary["continuations"]
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>bitcliff: the cliff</title>",
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>The cliff: {esc(str(summary['model']))}</h1>",
        f"<p>Full-precision perplexity {fp:.2f}; group size {summary['settings']['group_size']}; repair budget "
        f"{summary['settings']['budget']:g} extra bits per weight.</p>",
        f"<img id='cliff-plot' alt='cliff plot' src='data:image/png;base64,{cliff_plot(summary)}'>",
        "<table><thead><tr><th>bits</th><th>effective</th><th>RTN</th><th>GPTQ</th><th>repaired</th>"
        "<th>+bits</th><th>recovery</th><th>KL RTN / GPTQ / repaired</th><th>KL recovery</th>"
        f"<th>same top % RTN / GPTQ / repaired</th><th>verdict</th></tr></thead><tbody>{rows}</tbody></table>",
        "<p>Perplexity on the evaluation windows; KL: mean KL divergence from the full-precision model's "
        "next-token distribution, in nats per token; same top: tokens whose most likely next token is "
        "full precision's.</p>",
        *[_card(w, folder) for w in summary["widths"]],
        f"<h2>Continuations of “{esc(cont['prompt'])}” (greedy)</h2>",
        *[f"<p><b>{esc(name)}</b></p><blockquote>{esc(text)}</blockquote>" for name, text in cont["texts"].items()],
        f"<p>Steps took {summary['seconds']:.0f} s in all (finished steps are reused when the run is repeated).</p>",
        "</body></html>",
    ]
    return "\n".join(parts)


def write_report(summary: dict, folder: Path) -> Path:
    """Write ``report.html`` into the run folder and return its path."""
    page = render(summary, folder)
    return write_text(folder / "report.html", page)
