"""``bitcliff study``: sweep configurations, fit scaling laws of the damage per stratum, predict.

    bitcliff study sweep --models default gemma3-270m --bits 2 3 4 --group-sizes 32 64 128 -1 \\
        --calib 8 16 32 64 --methods rtn gptq --out runs/study
    bitcliff study fit runs/study
    bitcliff study predict runs/study/law.json --model default --method gptq --bits 3 --group-size 96 --calib 24
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

from bitcliff.cli.common import (
    HelpFormatter,
    UsageError,
    add_device_arg,
    check_location,
    check_model_arg,
    check_text_arg,
    positive_int,
)
from bitcliff.kernels.pack import SUPPORTED_BITS, widths_text


def add_parser(sub) -> None:
    p = sub.add_parser("study", help="scaling laws of the quantization damage per knowledge stratum",
                       formatter_class=HelpFormatter, description=__doc__)
    steps = p.add_subparsers(dest="step", required=True)

    s = steps.add_parser("sweep", help="measure every configuration of a grid, one row at a time (resumable)",
                         formatter_class=HelpFormatter)
    s.add_argument("--models", nargs="+", default=["default"])
    s.add_argument("--bits", type=int, nargs="+", default=list(SUPPORTED_BITS))
    s.add_argument("--group-sizes", type=int, nargs="+", default=[32, 64, 128, -1])
    s.add_argument("--calib", type=positive_int, nargs="+", default=[8, 16, 32, 64], help="GPTQ calibration windows")
    s.add_argument("--methods", nargs="+", default=["rtn", "gptq"])
    s.add_argument("--full-gptq", action="store_true",
                   help="GPTQ at every (bits, group size, calib); default: the calibration axis at g64 only")
    s.add_argument("--text-file", default="wiki", help="evaluation and calibration text")
    s.add_argument("--windows", type=positive_int, default=16, help="evaluation windows")
    s.add_argument("--strata", nargs="+", default=None, help="strata to measure (default: all)")
    s.add_argument("--out", required=True, help="sweep folder (created, or resumed)")
    add_device_arg(s)
    s.set_defaults(func=run_sweep)

    f = steps.add_parser("fit", help="fit the law per stratum and method; writes law.json and plots",
                         formatter_class=HelpFormatter)
    f.add_argument("folder", help="a sweep folder")
    f.set_defaults(func=run_fit)

    q = steps.add_parser("predict", help="predicted ppl and damage per stratum for a configuration",
                         formatter_class=HelpFormatter)
    q.add_argument("law", help="law.json (or the sweep folder holding it)")
    q.add_argument("--model", default="default", help="a model of the sweep")
    q.add_argument("--method", choices=["rtn", "gptq"], default="gptq")
    q.add_argument("--bits", type=int, required=True)
    q.add_argument("--group-size", type=int, default=64, help="-1 for per-channel")
    q.add_argument("--calib", type=positive_int, help="GPTQ calibration windows")
    q.add_argument("--json", action="store_true", help="print JSON instead of text")
    q.set_defaults(func=run_predict)


def run_sweep(args: argparse.Namespace) -> int:
    from bitcliff.study.strata import STRATA, check_strata
    from bitcliff.study.sweep import SweepSettings, grid
    from bitcliff.study.sweep import run_sweep as sweep

    for model in args.models:
        check_model_arg(model)
    check_text_arg(args.text_file)
    strata = check_strata(args.strata or STRATA)
    check_location(args.out, "--out", renamed=False)
    if any(g != -1 and (g <= 0 or g % 16) for g in args.group_sizes):
        raise UsageError(f"--group-sizes {args.group_sizes}: each must be a positive multiple of 16, or -1")
    if any(b not in SUPPORTED_BITS for b in args.bits):
        raise UsageError(f"--bits {args.bits}: each must be {widths_text()}")
    configs = grid(args.models, args.bits, args.group_sizes, args.calib if "gptq" in args.methods else [],
                   args.methods, args.full_gptq)
    rows = sweep(args.out, configs, SweepSettings(text=args.text_file, windows=args.windows, strata=strata),
                 device=args.device)
    print(f"{len(rows)} rows in {Path(args.out) / 'rows.jsonl'}; fit them with `bitcliff study fit {args.out}`")
    return 0


def run_fit(args: argparse.Namespace) -> int:
    from bitcliff.study.fit import LAW_FILE, fit_folder, load_law, summary

    fit_folder(args.folder)
    law, fits = load_law(Path(args.folder) / LAW_FILE)
    print("\n".join(summary(law, fits)))
    print(f"-> {Path(args.folder) / LAW_FILE}")
    return 0


def run_predict(args: argparse.Namespace) -> int:
    from bitcliff.quant.config import QuantConfig
    from bitcliff.study.fit import load_law
    from bitcliff.study.law import factors_of, predict

    law, fits = load_law(args.law)
    if args.model not in law["models"]:
        raise UsageError(f"--model {args.model!r} is not in this law's sweep ({', '.join(law['models'])})")
    if args.method == "gptq" and args.calib is None:
        raise UsageError("--calib: GPTQ predictions need the calibration windows")
    if args.method == "rtn" and args.calib is not None:
        raise UsageError("--calib applies to GPTQ only")
    chosen = {k: f for k, f in fits.items() if f.method == args.method}
    if not chosen:
        raise UsageError(f"the law has no {args.method} fits (its sweep had no {args.method} rows to fit)")
    model = law["models"][args.model]
    try:
        config = QuantConfig(bits=args.bits, group_size=args.group_size, method=args.method,
                             calib_samples=args.calib or 64)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    row = {"parameters": model["parameters"], "hidden_size": model["hidden_size"], "group_size": args.group_size,
           "effective_bits": config.effective_bits(model["hidden_size"]), "calib": args.calib}
    factors = factors_of(row)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        predictions = [predict(f, factors, model["nll_fp"].get(f.stratum)) for f in chosen.values()]
    notes = sorted({str(w.message) for w in caught})
    if args.json:
        print(json.dumps({"model": args.model, "method": args.method, "bits": args.bits,
                          "group_size": args.group_size, "calib": args.calib, "factors": factors,
                          "predictions": [p.__dict__ for p in predictions], "warnings": notes}, indent=1))
        return 0
    print(f"{args.model} {config.describe()}{f' c{args.calib}' if args.calib else ''}: "
          f"{factors['b_eff']:.3f} effective bits")
    for p in predictions:
        line = f"{p.stratum:>13}: damage {p.damage:.3f} nats [{p.damage_interval[0]:.3f}, {p.damage_interval[1]:.3f}]"
        if p.ppl is not None:
            line += f"  ppl {p.ppl:.2f} [{p.ppl_interval[0]:.2f}, {p.ppl_interval[1]:.2f}]"
        print(line)
    for note in notes:
        print(f"warning: {note}")
    return 0
