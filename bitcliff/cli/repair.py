"""``bitcliff repair``: training-free repair of a quantized checkpoint, chosen from its diagnosis."""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from bitcliff.cli.common import HelpFormatter, UsageError, check_model_arg, check_out, check_text_arg, evaluate

DEFAULT_BUDGET = 0.25


def add_parser(sub) -> None:
    p = sub.add_parser("repair", help="repair a quantized checkpoint without training, guided by its diagnosis",
                       formatter_class=HelpFormatter)
    p.add_argument("--model", default="default", help="the full-precision model the checkpoint was quantized from")
    p.add_argument("--quantized", required=True, help="the quantized checkpoint folder")
    p.add_argument("--budget", type=float, default=DEFAULT_BUDGET,
                   help="extra bits per quantized weight the repairs may store (adapter factors, restored "
                        "precision, added biases)")
    p.add_argument("--diagnosis", help="a diagnosis.json of this checkpoint to reuse (else it is diagnosed first)")
    p.add_argument("--methods", help="force these repairs, comma-separated: norm,bias,lowrank,restore "
                                     "(default: chosen by the verdict)")
    p.add_argument("--rank", type=int, help="one low-rank rank for every module (default: allocated by measured benefit)")
    p.add_argument("--text-file", default="wiki", help="calibration and evaluation text: 'wiki', 'canterbury' (embedded) or a UTF-8 file")
    p.add_argument("--calib-samples", type=int, default=64, help="calibration windows")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per window")
    p.add_argument("--windows", type=int, default=16, help="evaluation windows for the before/after perplexity")
    p.add_argument("--out", required=True, help="output folder: the repaired checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an output folder bitcliff wrote")
    p.set_defaults(func=run)


def parse_methods(value: str | None) -> list[str] | None:
    from bitcliff.repairs.plan import METHODS

    if value is None:
        return None
    methods = [m.strip() for m in value.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise UsageError(f"--methods {value!r}: choose from {', '.join(METHODS)}")
    return methods


def recovery(ppl_fp: float, ppl_q: float, ppl_r: float) -> float:
    """Share of the quantization gap the repair closes, in log perplexity."""
    gap = math.log(ppl_q) - math.log(ppl_fp)
    return (math.log(ppl_q) - math.log(ppl_r)) / gap if gap > 0 else float("nan")


def run(args: argparse.Namespace) -> int:
    import copy

    import bitcliff
    from bitcliff.assets import load_text
    from bitcliff.data import calibration_windows, evaluation_windows
    from bitcliff.diagnosis.run import DiagnoseOptions, diagnose
    from bitcliff.models import is_quantized_folder, load_fp_model
    from bitcliff.repairs.plan import PlanError, plan_repair

    methods = parse_methods(args.methods)
    if not (isinstance(args.budget, float) and math.isfinite(args.budget) and args.budget >= 0):
        raise UsageError(f"--budget {args.budget}: expected a finite number of extra bits per weight >= 0")
    if args.rank is not None and args.rank < 1:
        raise UsageError(f"--rank {args.rank}: must be at least 1")
    check_model_arg(args.model)
    check_text_arg(args.text_file)
    if not is_quantized_folder(args.quantized):
        raise UsageError(f"--quantized {args.quantized}: not a bitcliff/GPTQ checkpoint folder "
                         "(no config.json with quantization_config.quant_method = 'gptq')")
    report = None
    if args.diagnosis is not None:
        try:
            report = json.loads(Path(args.diagnosis).read_text())
        except (OSError, ValueError) as exc:
            raise UsageError(f"--diagnosis {args.diagnosis}: cannot be read as JSON ({exc})") from None
    out = Path(args.out)
    check_out(out, args.overwrite)

    fp_model, tokenizer, _ = load_fp_model(args.model)
    q_model = bitcliff.load(args.quantized)
    text = load_text(args.text_file)
    start = time.perf_counter()
    if report is None:
        examples = evaluation_windows(tokenizer, text, 16, 256)
        options = DiagnoseOptions(trace_examples=8, patch_examples=0, capture_examples=1)
        report = diagnose(fp_model, q_model, examples, options=options, name=Path(args.quantized).name).to_dict()
    diagnosis_seconds = time.perf_counter() - start
    try:
        plan = plan_repair(report, args.budget, methods=methods, rank=args.rank)
    except PlanError as exc:
        raise UsageError(f"--budget/--methods/--rank: {exc}") from None
    print(f"{report['headline']}\nplan ({plan.budget:g} bits per weight):")
    for reason in plan.reasons:
        print(f"  - {reason}")
    calib = calibration_windows(tokenizer, text, args.calib_samples, args.seq_len)
    before = copy.deepcopy(q_model)
    start = time.perf_counter()
    result = bitcliff.repair(fp_model, q_model, calib, plan)
    repair_seconds = time.perf_counter() - start
    ppl = {name: evaluate(model, tokenizer, args.text_file, args.windows, args.seq_len)["ppl"]
           for name, model in (("fp", fp_model), ("quantized", before), ("repaired", q_model))}
    share = recovery(ppl["fp"], ppl["quantized"], ppl["repaired"])
    record = {**result.to_dict(), "ppl": ppl, "recovery": share, "text": args.text_file,
              "seconds": {"diagnosis": round(diagnosis_seconds, 1), "repair": round(repair_seconds, 1)},
              "quantized": str(args.quantized), "model": args.model}
    text_record = json.dumps(record, indent=1)
    bitcliff.save(q_model, out, tokenizer=tokenizer, overwrite=args.overwrite,
                  extra_files={"repair.json": lambda path: Path(path).write_text(text_record)})
    print(f"spent {result.bits_per_weight:.4f} of {plan.budget:g} bits per weight in {repair_seconds:.0f} s; "
          f"ppl fp {ppl['fp']:.2f}, quantized {ppl['quantized']:.2f}, repaired {ppl['repaired']:.2f} "
          f"(recovers {share:.0%} of the gap) -> {out}")
    return 0
