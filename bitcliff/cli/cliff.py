"""``bitcliff cliff``: the main job: the 4 -> 3 -> 2-bit cliff, why it happens, what repair buys."""

from __future__ import annotations

import argparse
import time
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


def add_parser(sub) -> None:
    p = sub.add_parser(
        "cliff", formatter_class=HelpFormatter,
        help="the main job: RTN and GPTQ at each width, diagnosed, repaired, in one table and one report",
        description="For each width: RTN and GPTQ (best settings) evaluated, the GPTQ model diagnosed "
                    "(degradation or collapse) and repaired at --budget; a table, greedy continuations, "
                    "OUT/cliff.json and OUT/report.html.  Finished steps are kept in OUT and reused when the "
                    "same command runs again.")
    p.add_argument("--model", default="default", help="default, gemma3-270m, a local HF folder or a hub id")
    p.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2], help="the widths")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--budget", type=float, default=0.25, help="repair budget, extra bits per quantized weight")
    p.add_argument("--text-file", default="wiki", help="calibration and evaluation text: 'wiki', 'canterbury' (embedded) or a UTF-8 file")
    p.add_argument("--windows", type=positive_int, default=16, help="evaluation windows (512 tokens)")
    p.add_argument("--calib-samples", type=positive_int, default=32,
                   help="GPTQ calibration windows (half of `bitcliff quantize`'s default: as good on SmolLM2 W3, half the time)")
    p.add_argument("--repair-calib", type=positive_int, default=16,
                   help="repair calibration windows (32 gives slightly better repairs in 1.8x the time)")
    p.add_argument("--diagnosis-examples", type=positive_int, default=16, help="examples (256 tokens) for each diagnosis")
    p.add_argument("--trace-examples", type=positive_int, default=4, help="of those, examples traced layer by layer")
    p.add_argument("--out", default="runs/cliff", help="the run folder")
    p.add_argument("--restart", action="store_true", help="discard the run folder's finished steps first")
    p.add_argument("--workers", type=positive_int, metavar="N",
                   help="steps computed at once, each process on its share of the cores (default: 2 on a CPU "
                        "with 2 or more cores, 1 on a GPU); the numbers are the same")
    add_device_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from bitcliff.cliff.report import table
    from bitcliff.cliff.run import CliffSettings, run_cliff

    try:
        settings = CliffSettings(model=args.model, bits=tuple(args.bits), group_size=args.group_size,
                                 budget=args.budget, text=args.text_file, windows=args.windows,
                                 calib_samples=args.calib_samples, repair_calib=args.repair_calib,
                                 diagnosis_examples=args.diagnosis_examples, trace_examples=args.trace_examples)
    except ValueError as exc:
        field = str(exc).split(" ", 1)[0]  # the settings' messages start with the field they refuse
        raise UsageError(f"--{field.replace('_', '-')}: {exc}") from None
    check_model_arg(args.model)
    check_text_arg(args.text_file)
    out = Path(args.out)
    check_location(out, "--out", renamed=False)
    args.interrupted_hint = f"the finished steps are kept in {out}; run the same command again to resume"
    start = time.perf_counter()
    summary = run_cliff(settings, out, restart=args.restart, device=args.device, workers=args.workers)
    print(table(summary))
    print(f"\nwrote {out / 'cliff.json'} and {out / 'report.html'} ({time.perf_counter() - start:.0f} s)")
    return 0
