"""Perplexity table: RTN vs GPTQ variants over bit-widths and group sizes (the protocol of docs/architecture.md).

Rows: W4/W3/W2 x group sizes; columns: RTN and GPTQ plain, +act-order, +mse, +static-groups,
+true-sequential (the default ``--variants``), and on request the combinations with the scale
refit (``+refit``, ``+ts+refit``, ``+ts+static+refit``, ``+ts+refit3`` ...).  Every cell quantizes a fresh copy of the model and scores it on the 16
evaluation windows.  Results are appended to a JSON-lines file as they come, and cells already
there are skipped, so an interrupted sweep continues where it stopped; ``--markdown`` prints the
table from whatever the file holds.

Usage::

    python bench/gptq_table.py --model default --bits 4 3 2 --group-sizes 64 32 -1 \\
        --results bench/results/gptq_table-default.jsonl
    python bench/gptq_table.py --results bench/results/gptq_table-default.jsonl --markdown
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from bitcliff.rows import append_row, done_keys, read_rows

VARIANTS = {
    "rtn": {"method": "rtn"},
    "gptq": {},
    "+act-order": {"act_order": True},
    "+mse": {"mse": True},
    "+static-groups": {"static_groups": True},
    "+true-sequential": {"true_sequential": True},
    "+act-order+static": {"act_order": True, "static_groups": True},
    "+ts+static": {"true_sequential": True, "static_groups": True},
    "+refit": {"refit_rounds": 1},
    "+ts+refit": {"true_sequential": True, "refit_rounds": 1},
    "+ts+static+refit": {"true_sequential": True, "static_groups": True, "refit_rounds": 1},
    "+ts+refit3": {"true_sequential": True, "refit_rounds": 3},
    "+ts+static+refit3": {"true_sequential": True, "static_groups": True, "refit_rounds": 3},
}


def run(args: argparse.Namespace) -> None:
    import dataclasses

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bitcliff.assets import load_text, resolve_model
    from bitcliff.data import calibration_windows, evaluation_windows
    from bitcliff.eval import evaluate_ppl
    from bitcliff.quant.config import QuantConfig
    from bitcliff.quant.convert import quantize
    from bitcliff.quant.gptq_model import gptq_log

    path = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    text = load_text(args.text_file)
    calib = calibration_windows(tokenizer, text, args.calib_samples, args.seq_len)
    eval_ids = evaluation_windows(tokenizer, text, args.eval_windows, args.seq_len)
    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    done = done_keys(results, ("model", "bits", "group_size", "variant", "calib_samples"))

    def record(row: dict) -> None:
        append_row(results, row)

    if (args.model, 32, -1, "fp", args.calib_samples) not in done:
        fp = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        res = evaluate_ppl(fp, eval_ids, progress=False)
        record({"model": args.model, "bits": 32, "group_size": -1, "variant": "fp", "calib_samples": args.calib_samples,
                "ppl": res["ppl"], "seconds": 0.0})
    for bits in args.bits:
        for gs in args.group_sizes:
            for variant in args.variants:
                key = (args.model, bits, gs, variant, args.calib_samples)
                if key in done:
                    continue
                base = QuantConfig(bits=bits, group_size=gs, method="gptq", damp_percent=args.damp,
                                   calib_samples=args.calib_samples)
                config = dataclasses.replace(base, **VARIANTS[variant])
                model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
                start = time.perf_counter()
                if config.method == "gptq":
                    quantize(model, config, progress=False, calib_ids=calib)
                else:
                    quantize(model, config, progress=False)
                seconds = time.perf_counter() - start
                res = evaluate_ppl(model, eval_ids, progress=False)
                fallbacks = [e.module for e in gptq_log(model) or [] if e.fallback]
                row = {"model": args.model, "bits": bits, "group_size": gs, "variant": variant,
                       "calib_samples": args.calib_samples, "ppl": res["ppl"], "seconds": seconds,
                       "rtn_fallbacks": fallbacks, "config": config.to_dict()}
                record(row)
                print(f"{args.model} W{bits} g{gs} {variant:18s} ppl {res['ppl']:12.3f}  {seconds:6.1f} s", flush=True)


def markdown(rows: list[dict], variants: list[str]) -> str:
    lines = []
    for model in sorted({r["model"] for r in rows}):
        mine = [r for r in rows if r["model"] == model]
        fp = next((r for r in mine if r["variant"] == "fp"), None)
        cols = [v for v in variants if any(r["variant"] == v for r in mine)]
        calib = sorted({r["calib_samples"] for r in mine if r["variant"] != "fp"})
        lines.append(f"**{model}** (fp32 ppl {fp['ppl']:.2f}; calibration windows {calib})\n" if fp else f"**{model}**\n")
        lines.append("| setting | " + " | ".join(cols) + " |")
        lines.append("|---|" + "---:|" * len(cols))
        keys = sorted({(r["bits"], r["group_size"]) for r in mine if r["variant"] != "fp"},
                      key=lambda k: (-k[0], k[1] if k[1] > 0 else 10**6))
        for bits, gs in keys:
            cells = []
            for v in cols:
                hit = [r for r in mine if (r["bits"], r["group_size"], r["variant"]) == (bits, gs, v)]
                cells.append(_fmt(hit[-1]["ppl"]) if hit else "—")
            label = f"W{bits} {'per-channel' if gs == -1 else f'g{gs}'}"
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _fmt(ppl: float) -> str:
    return f"{ppl:.3g}" if ppl >= 1000 else f"{ppl:.2f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2])
    p.add_argument("--group-sizes", type=int, nargs="+", default=[64, 32, -1])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS)[:6], choices=list(VARIANTS))
    p.add_argument("--damp", type=float, default=0.01)
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--text-file", default="wiki")
    p.add_argument("--results", required=True, help="JSON-lines file: read to skip done cells, appended to")
    p.add_argument("--markdown", action="store_true", help="only print the table from --results")
    args = p.parse_args(argv)
    if not args.markdown:
        run(args)
    print(markdown(read_rows(Path(args.results)), list(VARIANTS)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
