"""The CPU kernel's table: each layer shape at batch 1 (or any row count), bitcliff's widths beside
fp32 and bf16 ``torch.matmul``, torch's own 4-bit CPU matmul, and the byte floor, from the rows of
``bench.cpu_kernels``.

    python -m bench.cpu_table bench/results/cpu-kernels-DATE.jsonl [--rows 1] [--threads 2] [--group 128]

Each cell is milliseconds per call, with the speedup over fp32 and the fraction of the byte floor
(the call's bytes over the measured read bandwidth) in parentheses.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def load_rows(path: Path) -> tuple[dict, list[dict]]:
    """(environment, measured rows) of a ``bench.cpu_kernels`` JSONL file (its last environment)."""
    environment, rows = {}, []
    for line in path.read_text().splitlines():
        row = json.loads(line)
        if "environment" in row:
            environment = row["environment"]
        else:
            rows.append(row)
    return environment, rows


def table(rows: list[dict], m: int, threads: int, group: int) -> str:
    """A markdown table: one line per shape, one column per variant."""
    chosen = [r for r in rows if r["rows"] == m and r["threads"] == threads]
    variants = ["fp32", "bf16", f"torch-int4g{group}", *[f"w{b}g{group}" for b in (4, 3, 2)]]
    present = [v for v in variants if any(r["variant"] == v for r in chosen)]
    header = ["shape (K x N)", *present]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for shape in dict.fromkeys(r["shape"] for r in chosen):
        cells = [shape]
        for variant in present:
            row = next((r for r in chosen if r["shape"] == shape and r["variant"] == variant), None)
            if row is None:
                cells.append("")
                continue
            speed = row.get("speedup_vs_fp32", 1.0)
            cells.append(f"{row['seconds'] * 1e3:.3g} ms ({speed:.2f}x, {row['fraction_of_floor']:.0%})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rows_file", type=Path)
    parser.add_argument("--rows", type=int, default=1, help="the row count M of the table")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--group", type=int, default=128)
    args = parser.parse_args(argv)
    if not args.rows_file.is_file():
        parser.error(f"{args.rows_file}: no such file")
    environment, rows = load_rows(args.rows_file)
    bandwidth = environment.get("read_bandwidth_gbs", {}).get(str(args.threads))
    print(f"M = {args.rows}, {args.threads} threads, g{args.group}; read bandwidth "
          f"{bandwidth:.1f} GB/s; {environment.get('cpu_path', '')}" if bandwidth else "")
    print(table(rows, args.rows, args.threads, args.group))
    return 0


if __name__ == "__main__":
    sys.exit(main())
