"""``bitcliff quantize``: quantize a model and save a GPTQ-format checkpoint."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from bitcliff.cli.common import (
    HelpFormatter,
    UsageError,
    add_quant_args,
    add_text_args,
    check_model_arg,
    check_out,
    check_text_arg,
    config_from_args,
    quantize_model,
)


def add_parser(sub) -> None:
    p = sub.add_parser("quantize", help="quantize a model and save a GPTQ-format checkpoint",
                       formatter_class=HelpFormatter)
    p.add_argument("--model", default="default", help="default, gemma3-270m, a local HF folder or a hub id")
    p.add_argument("--bits", type=int, required=True, help="2, 3 or 4")
    add_quant_args(p)
    add_text_args(p)
    p.add_argument("--out", required=True, help="output checkpoint folder")
    p.add_argument("--overwrite", action="store_true", help="replace an output folder bitcliff wrote")
    p.add_argument("--checkpoint-format", default="auto", choices=["auto", "gptq", "gptq_v2"],
                   help="zero points as v1 (gptq) or v2; auto: v1 for symmetric, v2 for asymmetric grids")
    p.add_argument("--streaming", action="store_true",
                   help="GPTQ one decoder layer at a time from the source files (models larger than memory); "
                        "an interrupted run resumes from its last finished layer")
    p.add_argument("--restart", action="store_true", help="with --streaming: discard a partial run and start over")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from bitcliff.models import load_fp_model
    from bitcliff.quant.checkpoint import save

    config = config_from_args(args, args.bits, args.group_size)
    check_model_arg(args.model)
    check_text_arg(args.text_file)
    if config.method == "rtn" and args.text_file != "wiki":
        raise UsageError("--text-file is read only by GPTQ calibration; RTN needs no text (drop it or pass --method gptq)")
    if args.streaming and config.method != "gptq":
        raise UsageError("--streaming is a GPTQ mode; pass --method gptq (RTN needs no calibration pass)")
    if args.restart and not args.streaming:
        raise UsageError("--restart discards a partial --streaming run; it has no meaning without --streaming")
    out = Path(args.out)
    check_out(out, args.overwrite)
    if args.streaming:
        return _quantize_streaming(args, config, out)
    model, tokenizer, path = load_fp_model(args.model)
    start = time.perf_counter()
    quantize_model(model, tokenizer, config, args.text_file, args.seq_len)
    seconds = time.perf_counter() - start
    save(model, out, tokenizer=tokenizer, overwrite=args.overwrite, checkpoint_format=args.checkpoint_format)
    print(f"quantized {path} with {config.describe()} in {seconds:.1f} s -> {out}")
    return 0


def _quantize_streaming(args: argparse.Namespace, config, out: Path) -> int:
    """GPTQ one decoder layer at a time from the source safetensors; resumes an interrupted run."""
    from transformers import AutoTokenizer

    from bitcliff.assets import load_text, resolve_model
    from bitcliff.data import calibration_windows
    from bitcliff.quant.gptq_stream import quantize_gptq_streaming

    path = resolve_model(args.model)
    if not Path(path).is_dir():
        raise UsageError(f"--streaming reads a local safetensors folder; {args.model!r} resolved to {path}")
    tokenizer = AutoTokenizer.from_pretrained(path)
    calib = calibration_windows(tokenizer, load_text(args.text_file), config.calib_samples, args.seq_len)
    args.interrupted_hint = (f"the finished layers are kept in {out.parent / (out.name + '.partial')}; run the same "
                             "command again to resume from there (--restart discards them)")
    start = time.perf_counter()
    quantize_gptq_streaming(path, config, calib, out, overwrite=args.overwrite, resume=not args.restart,
                            checkpoint_format=args.checkpoint_format)
    print(f"quantized {path} with {config.describe()} (streaming) in {time.perf_counter() - start:.1f} s -> {out}")
    return 0
