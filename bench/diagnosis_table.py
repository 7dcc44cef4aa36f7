"""Summarize diagnosis runs (``bitcliff diagnose --out DIR``) into one markdown table, and
re-draw their key plots from the JSON files.

``--rejudge`` re-applies the current verdict rules (``bitcliff.diagnosis.verdict``) to the stored
measurements and rewrites each run's ``diagnosis.json`` and ``report.html`` (the measurements are
untouched; runs made before a rule change then read like new ones).

Usage::

    python bench/diagnosis_table.py runs/diag/*/diagnosis.json --rejudge --plots docs/diagnosis --copy-json
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path


def _row(data: dict) -> str:
    v, meta = data["verdict"], data["meta"]
    ind = {i["name"]: i for i in v["indicators"]}

    def cell(name: str) -> str:
        if name not in ind:
            return "–"
        i = ind[name]
        return f"{i['value']:.3g}{' **✗**' if i['fires'] else ''}"

    name = meta.get("name", "?")
    pred = data["inputs"]["predictor"][name]
    rho = data["layer_errors"]["agreement_with_trace"]
    return (f"| {meta.get('model', meta.get('model_type'))} | {name} | {data['ppl_q']:.4g} ({v['ppl_ratio']:.3g}x) | "
            f"**{v['label']}** {v.get('agreement', v.get('confidence')):.2f} | {cell('early_cosine')} | {cell('early_function')} | "
            f"{cell('early_attention')} | {cell('final_agreement')} | {_half_recovery(data)} | "
            f"{'–' if rho is None else f'{rho:.2f}'} | {pred['final_spearman']:.2f} / {pred['final_auroc']:.2f} "
            f"(best L{pred['best_layer']} {pred['best_auroc']:.2f}) | {meta.get('wall_seconds', '–')} |")


def _half_recovery(data: dict) -> str:
    """The layer after which restoring the FP residual recovers half the damage, of n layers."""
    patching = data.get("patching")
    curve = (patching or {}).get("recovery", {}).get("residual")
    if not curve or None in curve:
        return "–"
    return f"{next(i for i, r in enumerate(curve) if r >= 0.5 or i == len(curve) - 1)}/{len(curve)}"


def rejudge(path: Path) -> dict:
    """Recompute the verdict of a saved run with the current rules; rewrite its JSON and HTML."""
    from bitcliff.diagnosis.report import HTML_NAME, json_safe, render_html
    from bitcliff.diagnosis.verdict import verdict_from_dict

    data = json.loads(path.read_text())
    verdict = verdict_from_dict(data)
    data["verdict"], data["headline"] = verdict.to_dict(), verdict.headline()
    for target, text in ((path, json.dumps(json_safe(data), indent=1)), (path.parent / HTML_NAME, render_html(data))):
        tmp = target.with_suffix(target.suffix + ".tmp")
        tmp.write_text(text)
        tmp.replace(target)
    return data


HEADER = (
    "| model | setting | ppl Q (ratio) | verdict, agreement | early cos | early F | early JS | final top-1 "
    "| half recovered after layer | capture~trace ρ | magnitude→ΔNLL ρ / AUROC | wall s |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("reports", nargs="+", help="diagnosis.json files")
    p.add_argument("--plots", help="folder to write each run's key plots into (PNG)")
    p.add_argument("--copy-json", action="store_true", help="also copy each diagnosis.json into --plots")
    p.add_argument("--rejudge", action="store_true", help="re-apply the current verdict rules, rewrite JSON and HTML")
    args = p.parse_args(argv)
    rows = []
    for path in map(Path, args.reports):
        data = rejudge(path) if args.rejudge else json.loads(path.read_text())
        rows.append(_row(data))
        for other in data["meta"].get("compare", []):
            name = data["meta"]["name"]
            corr = data["inputs"]["correlation"]
            print(f"ΔNLL correlation {name} vs {other}: Pearson {corr['pearson'][name][other]:.3f}, "
                  f"Spearman {corr['spearman'][name][other]:.3f}", file=sys.stderr)
        if args.plots:
            from bitcliff.diagnosis import plots

            out = Path(args.plots)
            out.mkdir(parents=True, exist_ok=True)
            stem = path.parent.name
            (out / f"{stem}-signal.png").write_bytes(plots.signal_plot(data["signal"]))
            (out / f"{stem}-function.png").write_bytes(plots.function_plot(data["components"]))
            if data.get("patching"):
                (out / f"{stem}-patching.png").write_bytes(plots.patching_plot(data["patching"]))
            if args.copy_json:
                shutil.copyfile(path, out / f"{stem}.json")
    print(HEADER)
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
