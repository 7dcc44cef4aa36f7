"""``bitcliff repair``: training-free repair of a quantized checkpoint, chosen from its diagnosis."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bitcliff.cli.common import (
    HelpFormatter,
    UsageError,
    add_device_arg,
    check_model_arg,
    check_out,
    check_text_arg,
    nonnegative_int,
    positive_int,
    window_length,
)
from bitcliff.quant.factors import FACTOR_WIDTHS
from bitcliff.repairs.plan import ALLOCATOR, ALLOCATORS, FACTOR_BITS, REFINE_ROUNDS

DEFAULT_BUDGET = 0.25


def add_parser(sub) -> None:
    from bitcliff.repairs.plan import method_names

    p = sub.add_parser("repair", help="repair a quantized checkpoint without training, guided by its diagnosis",
                       formatter_class=HelpFormatter)
    p.add_argument("--model", default="default", help="the full-precision model the checkpoint was quantized from")
    p.add_argument("--quantized", required=True, help="the quantized checkpoint folder")
    p.add_argument("--budget", type=float, default=DEFAULT_BUDGET,
                   help="extra bits per quantized weight the repairs may store (sparse outliers, adapter factors, restored "
                        "precision, added biases)")
    p.add_argument("--diagnosis", help="a diagnosis.json of this checkpoint to reuse (else it is diagnosed first)")
    p.add_argument("--methods", help=f"force these repairs, comma-separated: {','.join(method_names())} "
                                     "(default: chosen by the verdict)")
    p.add_argument("--rank", type=positive_int, help="one low-rank rank for every module (default: allocated by measured benefit)")
    p.add_argument("--refine-rounds", type=nonnegative_int, default=REFINE_ROUNDS, metavar="R",
                   help="low rank: re-quantize each module around its factors and refit them, R times "
                        "(alternating refinement; 0: keep the checkpoint's codes)")
    p.add_argument("--factor-bits", type=int, choices=FACTOR_WIDTHS, default=FACTOR_BITS, metavar="B",
                   help="low rank: store its factors at B bits, 2, 3 or 4 with group scales (lowrank.safetensors), or "
                        "16 (fp16, a PEFT LoRA adapter)")
    p.add_argument("--allocator", choices=ALLOCATORS, default=ALLOCATOR,
                   help="how the budget is split: 'measured' (a measuring pass on a few calibration windows, then "
                        "every module's options weighed by the loss each removes per bit) or 'diagnosis' (layer "
                        "shares by the error each adds)")
    p.add_argument("--text-file", default="wiki", help="calibration and evaluation text: 'wiki', 'canterbury' (embedded) or a UTF-8 file")
    p.add_argument("--calib-samples", type=positive_int, default=64, help="calibration windows")
    p.add_argument("--seq-len", type=window_length, default=512, help="tokens per window")
    p.add_argument("--windows", type=positive_int, default=16, help="evaluation windows for the before/after perplexity")
    p.add_argument("--out", required=True, help="output folder: the repaired checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an output folder bitcliff wrote")
    add_device_arg(p)
    p.set_defaults(func=run)


def parse_methods(value: str | None) -> list[str] | None:
    """``--methods``: repair names, checked against the registry."""
    from bitcliff.repairs.plan import method_names

    if value is None:
        return None
    methods = [m.strip() for m in value.split(",") if m.strip()]
    unknown = [m for m in methods if m not in method_names()]
    if unknown or not methods:
        raise UsageError(f"--methods {value!r}: choose from {', '.join(method_names())}")
    return methods


def run(args: argparse.Namespace) -> int:
    import bitcliff
    from bitcliff.assets import load_text
    from bitcliff.data import calibration_windows, evaluation_windows
    from bitcliff.device import describe
    from bitcliff.divergence import kl_recovery
    from bitcliff.models import is_quantized_folder, load_fp_model
    from bitcliff.repairs.plan import PlanError, check_budget
    from bitcliff.repairs.run import diagnose_and_repair

    methods = parse_methods(args.methods)
    try:
        check_budget(args.budget)
    except PlanError as exc:
        raise UsageError(f"--budget {args.budget}: {exc}") from None
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

    fp_model, tokenizer, _ = load_fp_model(args.model, device=args.device)
    q_model = bitcliff.load(args.quantized, device=args.device)
    text = load_text(args.text_file)

    def show(diagnosis, plan):
        print(f"{diagnosis['headline']}\nplan ({plan.planned_bits / plan.weights:.4f} of a budget of {plan.budget:g} "
              "bits per weight):")
        for reason in plan.reasons:
            print(f"  - {reason}")

    try:
        outcome = diagnose_and_repair(
            fp_model, q_model, calibration_windows(tokenizer, text, args.calib_samples, args.seq_len), args.budget,
            diagnosis=report, examples=None if report is not None else evaluation_windows(tokenizer, text, 16, 256),
            plan_options={"methods": methods, "rank": args.rank, "refine_rounds": args.refine_rounds,
                          "factor_bits": args.factor_bits, "allocator": args.allocator},
            eval_ids=evaluation_windows(tokenizer, text, args.windows, args.seq_len), divergence=True,
            out=out, tokenizer=tokenizer, overwrite=args.overwrite, on_plan=show, name=Path(args.quantized).name,
            record_extra={"text": args.text_file, "quantized": str(args.quantized), "model": args.model,
                          "device": describe(args.device)},
        )
    except PlanError as exc:
        raise UsageError(f"--budget/--methods/--rank/--refine-rounds/--factor-bits: {exc}") from None
    if outcome.result is None:
        print("nothing to repair; nothing written")
        return 0
    ppl = outcome.ppl
    print(f"spent {outcome.result.bits_per_weight:.4f} of {outcome.plan.budget:g} bits per weight in "
          f"{outcome.seconds['repair']:.0f} s; ppl fp {ppl['fp']:.2f}, quantized {ppl['quantized']:.2f}, "
          f"repaired {ppl['repaired']:.2f} (recovers {outcome.recovery:.0%} of the gap) -> {out}")
    before, after = outcome.divergence["quantized"], outcome.divergence["repaired"]
    print(f"KL divergence from fp (nats per token): quantized {before['kl_mean']:.4f}, repaired "
          f"{after['kl_mean']:.4f} (recovers {kl_recovery(before['kl_mean'], after['kl_mean']):.0%}); "
          f"same top token {before['same_top_pct']:.1f} % -> {after['same_top_pct']:.1f} %")
    return 0
