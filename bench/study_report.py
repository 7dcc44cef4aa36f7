"""The study's Markdown tables: full-precision NLL per model, damage per configuration, and the
held-out predictions against their measurements.

    python -m bench.study_report bench/results/study-rows.jsonl \\
        --holdout bench/results/study-holdout.json

Prints to standard output; docs/study.md holds its output.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path


def _group(row: dict) -> str:
    return "pc" if row["group_size"] == -1 else str(row["group_size"])


def fp_table(rows: list[dict]) -> list[str]:
    strata = list(rows[0]["nll"])
    lines = ["| model | linear weights | ppl | " + " | ".join(f"NLL {s} (tokens)" for s in strata) + " |",
             "|---|---:|---:|" + "---:|" * len(strata)]
    for r in rows:
        if r["method"] == "fp":
            cells = " | ".join(f"{r['nll'][s]:.3f} ({r['tokens'][s]:,})" for s in strata)
            lines.append(f"| {r['model']} | {r['parameters'] / 1e6:.1f}M | {r['ppl']:.2f} | {cells} |")
    return lines


def damage_table(rows: list[dict], method: str) -> list[str]:
    """One line per quantized row of ``method``, sorted by model, bits, group size (per-channel
    last) and calibration."""
    def order(r: dict) -> tuple:
        return r["model"], r["bits"], r["group_size"] if r["group_size"] > 0 else math.inf, r.get("calib") or 0

    chosen = sorted((r for r in rows if r["method"] == method), key=order)
    strata = list(chosen[0]["damage"])
    calib = method == "gptq"
    lines = ["| model | bits | group | " + ("calib | " if calib else "") + "b_eff | ppl | "
             + " | ".join(strata) + " |",
             "|---|---|---|" + ("---:|" if calib else "") + "---|---:|" + "---:|" * len(strata)]
    for r in chosen:
        cells = " | ".join(f"{r['damage'][s]:.3f}" for s in strata)
        lines.append(f"| {r['model']} | {r['bits']} | {_group(r)} | " + (f"{r['calib']} | " if calib else "")
                     + f"{r['effective_bits']:.3f} | {r['ppl']:,.2f} | {cells} |")
    return lines


def holdout_table(holdout: dict) -> list[str]:
    header = ("| model | configuration | stratum | measured damage | predicted [90 % interval] | inside "
              "| ppl measured | ppl predicted [interval] |")
    lines = [header, "|---|---|---|---:|---|---|---:|---|"]
    for row in holdout["rows"]:
        config = row["config"] + (f" c{row['calib']}" if row["calib"] else "")
        for stratum, c in row["checks"].items():
            lo, hi = c["interval"]
            ppl = (f"{c['ppl']:.2f} | {c['ppl_predicted']:.2f} [{c['ppl_interval'][0]:.2f}, "
                   f"{c['ppl_interval'][1]:.2f}]") if "ppl" in c else " | "
            lines.append(f"| {row['model']} | {config} | {stratum} | {c['damage']:.3f} | "
                         f"{c['predicted']:.3f} [{lo:.3f}, {hi:.3f}] | {'yes' if c['inside'] else '**no**'} | {ppl} |")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rows", type=Path, help="a study sweep folder, or its rows (JSON lines)")
    parser.add_argument("--holdout", type=Path, help="bench.study_holdout's output")
    args = parser.parse_args(argv)

    from bitcliff.study.sweep import damages, read_rows

    rows = read_rows(args.rows)
    measured = damages(rows)
    sections = [fp_table(rows)] + [damage_table(measured, m) for m in ("rtn", "gptq")
                                   if any(r["method"] == m for r in measured)]
    if args.holdout:
        sections.append(holdout_table(json.loads(args.holdout.read_text())))
    print("\n\n".join("\n".join(s) for s in sections))
    return 0


if __name__ == "__main__":
    sys.exit(main())
