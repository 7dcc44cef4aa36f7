"""The repair table as a plot and a Markdown table: perplexity against bits per weight, repairs
against uniform bits.

    python -m bench.repair_report bench/results/repair-default.jsonl --out docs/repair/repair-default.png

One panel per evaluation text.  The uniform-bits curves join the quantized models' own rows
(variant ``none``) of one method and group size, so a repair point below the curve at the same
bits per weight beats spending those bits uniformly; every repair point sits at the quantized
model's effective bits plus the bits it spent.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import defaultdict
from pathlib import Path

from matplotlib.figure import Figure

from bitcliff import rows as rows_file

MARKERS = {"plan": "o", "lowrank": "s", "restore": "^", "heuristic": "v", "eora": "D", "bias": "P", "norm": "X",
           "outliers": "*", "mixed": "h"}


def read_rows(path: Path) -> list[dict]:
    """The finished (not skipped) rows of a repair table (JSON lines)."""
    return [r for r in rows_file.read_rows(path) if "skipped" not in r]


def bits_per_weight(row: dict) -> float:
    return row["effective_bits"] + row["bits_spent"]


def plot(rows: list[dict], texts=("wiki", "canterbury")) -> Figure:
    """The figure: per text, uniform curves (lines) and repairs (markers), log perplexity."""
    figure = Figure(figsize=(5.2 * len(texts), 4.4), layout="constrained")
    axes = figure.subplots(1, len(texts), squeeze=False)[0]
    for ax, text in zip(axes, texts):
        uniform = defaultdict(list)
        repairs = defaultdict(list)
        for row in rows:
            if row["variant"] == "none":
                uniform[(row["method"], row["group_size"])].append(row)
            else:
                repairs[(row["method"], row["variant"])].append(row)
        for (method, group), points in sorted(uniform.items()):
            points.sort(key=bits_per_weight)
            ax.plot([bits_per_weight(r) for r in points], [r["ppl"][text] for r in points],
                    "-" if group == 64 else ":", color="0.45" if method == "gptq" else "0.7", marker=".",
                    label=f"{method.upper()} g{group}, uniform bits")
        for (method, variant), points in sorted(repairs.items()):
            points.sort(key=bits_per_weight)
            ax.plot([bits_per_weight(r) for r in points], [r["ppl"][text] for r in points],
                    linestyle="none", marker=MARKERS.get(variant, "*"), markersize=6,
                    label=f"{method.upper()} + {variant}")
        ax.set_yscale("log")
        ax.set_xlabel("bits per quantized weight (scales, zeros and repairs counted)")
        ax.set_ylabel(f"perplexity, {text} (log)")
        ax.set_title(text)
        ax.grid(True, which="both", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside lower center", ncol=4, fontsize=8)
    return figure


def uniform_ppl(rows: list[dict], method: str, bits: float, text: str, group_size: int = 64) -> float:
    """Perplexity of the uniform-bits curve at ``bits`` per weight: the quantized models' own rows
    of ``method`` at ``group_size`` (variant ``none``), interpolated linearly in log perplexity;
    NaN outside the measured range."""
    points = sorted((bits_per_weight(r), math.log(r["ppl"][text])) for r in rows
                    if r["variant"] == "none" and r["method"] == method and r["group_size"] == group_size)
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= bits <= x1:
            return math.exp(y0 + (y1 - y0) * (bits - x0) / (x1 - x0))
    return float("nan")


def markdown(rows: list[dict], texts=("wiki", "canterbury")) -> str:
    """One line per row: the setting, bits, perplexities, recovery, and the uniform curve at the same bits."""
    head = ("| quantized | variant | +bits | bits/weight | " + " | ".join(f"ppl {t}" for t in texts) +
            " | " + " | ".join(f"recovery {t}" for t in texts) + " | uniform at same bits (wiki) | repair s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in sorted(rows, key=lambda r: (r["method"], -r["bits"], r["group_size"], r["budget"], r["variant"] != "plan",
                                         r["variant"])):
        bpw = bits_per_weight(r)
        uniform = uniform_ppl(rows, r["method"], bpw, "wiki") if r["variant"] != "none" else float("nan")
        variant = r["variant"] + (f" (calib windows {r['calib_offset']}+)" if r.get("calib_offset") else "")
        lines.append(
            f"| {r['method'].upper()} W{r['bits']} g{r['group_size']} | {variant} | {r['bits_spent']:.3f} | "
            f"{bpw:.2f} | " + " | ".join(f"{r['ppl'][t]:.2f}" for t in texts) + " | " +
            " | ".join(f"{r['recovery'][t]:.0%}" if r["variant"] != "none" else "" for t in texts) + " | " +
            (f"{uniform:.2f}" if uniform == uniform else "") + " | " + (f"{r['seconds']:.0f}" if "seconds" in r else "")
            + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("table", type=Path, help="a repair table (JSON lines, bench/repair_table.py)")
    parser.add_argument("--out", type=Path, required=True, help="the PNG to write")
    parser.add_argument("--method", default="gptq", help="plot this quantization method's rows (one scale)")
    parser.add_argument("--model", default="default", help="this model's rows")
    args = parser.parse_args(argv)
    rows = [r for r in read_rows(args.table) if r["method"] == args.method and r["model"] == args.model]
    if not rows:
        parser.error(f"{args.table} holds no finished {args.model} {args.method} rows")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    plot(rows).savefig(args.out, dpi=120)
    print(markdown(rows))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
