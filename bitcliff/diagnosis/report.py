"""The diagnosis as text (printed summary), JSON and a self-contained HTML page.

The HTML embeds every figure as a base64 PNG and has no external resources, so it can be mailed
or attached to an issue as one file.  ``render_html`` works from the JSON dictionary alone.
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path

from bitcliff.diagnosis import plots
from bitcliff.storage import replace_folder

JSON_NAME = "diagnosis.json"
HTML_NAME = "report.html"


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.{digits}g}" if abs(value) >= 1e4 or (value != 0 and abs(value) < 1e-3) else f"{value:.{digits}f}"
    return str(value)


def summary_text(report) -> str:
    """Plain-text summary: line 1 = verdict, agreement and the three strongest pieces of evidence."""
    data = report if isinstance(report, dict) else report.to_dict()
    verdict = data["verdict"]
    top3 = "; ".join(verdict["evidence"][:3]) or "no indicator evaluated"
    lines = [f"{data['headline']}: {top3}"]
    lines.append(f"perplexity: FP {data['ppl_fp']:.3f}, quantized {data['ppl_q']:.3f} (ratio {verdict['ppl_ratio']:.3f})")
    lines.append("indicators (value vs threshold, fires = votes for collapse):")
    for ind in verdict["indicators"]:
        lines.append(f"  {ind['name']:<17} {_fmt(ind['value']):>9}  threshold {ind['threshold']:<6g} "
                     f"{'FIRES' if ind['fires'] else 'ok'}")
    lines.append(f"recommendation: {verdict['recommendation']}")
    sig = data["signal"]
    lines.append(f"signal: rel. error layer 0 {sig['rel_error'][0]:.3f} -> last {sig['rel_error'][-1]:.3f}; "
                 f"final top-1 agreement {sig['lens_top1'][-1]:.2f}")
    rho = data["layer_errors"]["agreement_with_trace"]
    lines.append(f"capture vs trace (Spearman over layers): {_fmt(rho, 2)}")
    lines.append(inputs_text(data))
    return "\n".join(lines)


def _interval(pair) -> str:
    return "" if not pair else f" [{pair[0]:.2f}, {pair[1]:.2f}]"


def inputs_text(data: dict) -> str:
    """The which-inputs-break statistics with their sample size and 95 % intervals."""
    inputs = data["inputs"]
    name = data["meta"].get("name", "quantized")
    pred = inputs["predictor"][name]
    n = pred.get("examples", len(inputs["nll_fp"]))
    line = (f"which inputs break (n = {n} examples): residual magnitude (last layer) vs ΔNLL Spearman "
            f"{_fmt(pred['final_spearman'], 2)}{_interval(pred.get('final_spearman_interval'))}; ")
    if pred.get("withheld"):
        line += f"AUROC withheld: {pred['withheld']}"
    else:
        line += (f"AUROC top {inputs['top_fraction']:.0%} {_fmt(pred['final_auroc'], 2)}"
                 f"{_interval(pred.get('final_auroc_interval'))} (best layer {pred['best_layer']}, chosen on the "
                 f"same examples: {_fmt(pred['best_auroc'], 2)})")
    lines = [line]
    intervals = inputs["correlation"].get("spearman_interval", {})
    for other in data["meta"].get("compare", []):
        lines.append(f"  ΔNLL correlation with {other}: Pearson {_fmt(inputs['correlation']['pearson'][name][other], 2)}, "
                     f"Spearman {_fmt(inputs['correlation']['spearman'][name][other], 2)}"
                     f"{_interval(intervals.get(name, {}).get(other))}")
    return "\n".join(lines)


def _img(png: bytes, alt: str) -> str:
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}"></figure>'


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_STYLE = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.5em} h2{font-size:1.15em;margin-top:2em;border-bottom:1px solid #ddd}
.verdict{font-size:1.3em;font-weight:bold;padding:.6em;border-radius:6px}
.collapse{background:#fde2e1}.degradation{background:#fff4d6}.healthy{background:#e3f6e3}.mixed{background:#e8e8f8}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}
td,th{border:1px solid #ccc;padding:2px 6px;text-align:right} th{background:#f3f3f3}
figure{margin:.5em 0} img{max-width:100%} code{background:#f3f3f3;padding:0 3px}
"""


def render_html(data: dict) -> str:
    """The self-contained HTML report from ``DiagnosisReport.to_dict()``."""
    verdict, meta, sig = data["verdict"], data["meta"], data["signal"]
    name = meta.get("name", "quantized")
    esc = html.escape
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>bitcliff diagnosis: {esc(name)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>bitcliff diagnosis: {esc(name)}</h1>",
        f"<p class='verdict {esc(verdict['label'])}' id='verdict'>{esc(data['headline'])}</p>",
        f"<p>Perplexity FP {data['ppl_fp']:.3f}, quantized {data['ppl_q']:.3f} "
        f"(ratio {verdict['ppl_ratio']:.3f}) over {meta.get('examples')} examples.</p>",
        "<h2>Evidence (strongest first)</h2><ol>",
        *(f"<li>{esc(e)}</li>" for e in verdict["evidence"]),
        "</ol>",
        f"<p><b>Recommendation:</b> {esc(verdict['recommendation'])}</p>",
        "<h2>Indicators and thresholds</h2>",
        _table(["indicator", "value", "threshold", "votes for collapse"],
               [[i["name"], i["value"], i["threshold"], "yes" if i["fires"] else "no"] for i in verdict["indicators"]]),
        "<p>Thresholds were calibrated once on the default model (RTN g64, W4 vs W2) and are not tuned "
        f"per model. Collapse needs {verdict['thresholds']['collapse_votes']} votes, degradation at most "
        f"{verdict['thresholds']['degradation_votes']}; healthy needs none and a perplexity ratio at most "
        f"{verdict['thresholds']['healthy_ppl_ratio']}.</p>",
        "<h2>1. Signal propagation</h2>",
        _img(plots.signal_plot(sig), "signal propagation plot"),
        _img(plots.lens_plot(sig), "logit lens plot"),
        "<h2>2. Component function</h2>",
        _img(plots.function_plot(data["components"]), "component function plot"),
        _img(plots.attention_plot(data["components"]), "attention divergence heat map"),
    ]
    if data.get("patching"):
        parts += ["<h2>3. Activation patching</h2>", _img(plots.patching_plot(data["patching"]), "patching heat map"),
                  f"<p>Sum of single-component recoveries: {esc(_fmt(data['patching']['total_single']))}.</p>"]
    else:
        parts += ["<h2>3. Activation patching</h2><p>Not run.</p>"]
    parts += [
        "<h2>4. Kernel capture per layer</h2>",
        _img(plots.capture_plot(data["layer_errors"], sig), "capture per layer plot"),
        "<h2>5. Which inputs break</h2>",
        f"<p>{esc(inputs_text(data)).replace(chr(10), '<br>')}</p>",
        _img(plots.inputs_plot(data["inputs"], name), "which inputs break plot"),
    ]
    corr = data["inputs"]["correlation"]["spearman"]
    if len(corr) > 1:
        names = list(corr)
        parts.append("<p>Spearman correlation of per-example ΔNLL between quantizations:</p>")
        parts.append(_table(["", *names], [[a, *[corr[a][b] for b in names]] for a in names]))
    layer_rows = [
        [i, sig["rel_error"][i], sig["cosine"][i], sig["local_error"][i], sig["lens_kl"][i], sig["lens_top1"][i],
         data["components"]["function"]["local"]["attn"][i], data["components"]["function"]["local"]["mlp"][i],
         data["layer_errors"]["layers"][i]["rel_err"]]
        for i in range(len(sig["rel_error"]))
    ]
    parts += [
        "<h2>Per-layer table</h2>",
        _table(["layer", "rel. error", "cosine", "local error", "lens KL", "lens top-1", "F attn (local)",
                "F mlp (local)", "capture rel. error"], layer_rows),
        f"<h2>Run</h2><pre>{esc(json.dumps(meta, indent=1, default=str))}</pre>",
        "</body></html>",
    ]
    return "\n".join(parts)


def json_safe(value):
    """``value`` with NaN and infinities replaced by None (strict JSON has no such numbers)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def save_report(report, out_dir: Path, overwrite: bool = False) -> dict[str, Path]:
    """Write ``diagnosis.json`` and ``report.html`` into ``out_dir`` as one atomic folder write
    (an existing, non-empty ``out_dir`` is replaced only with ``overwrite``)."""
    data = report if isinstance(report, dict) else report.to_dict()
    page = render_html(data)  # render before touching the disk: a plotting error writes nothing
    text = json.dumps(json_safe(data), indent=1, allow_nan=False, default=str)

    def fill(tmp: Path) -> None:
        (tmp / JSON_NAME).write_text(text)
        (tmp / HTML_NAME).write_text(page)

    replace_folder(Path(out_dir), fill, overwrite, kind="diagnosis")
    return {"json": Path(out_dir) / JSON_NAME, "html": Path(out_dir) / HTML_NAME}
