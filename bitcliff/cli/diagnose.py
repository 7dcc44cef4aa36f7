"""``bitcliff diagnose``: why a quantized model breaks: degradation vs collapse, JSON + HTML report."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import time
from pathlib import Path

from bitcliff.cli.common import (
    HelpFormatter,
    UsageError,
    add_device_arg,
    add_quant_args,
    check_model_arg,
    check_out,
    check_text_arg,
    config_from_args,
    nonnegative_int,
    positive_int,
    window_length,
)
from bitcliff.quant.convert import quantize_on_text


def add_parser(sub) -> None:
    p = sub.add_parser("diagnose", help="why a quantized model breaks: degradation vs collapse, JSON + HTML report",
                       formatter_class=HelpFormatter)
    p.add_argument("--model", default="default", help="the full-precision model: default, gemma3-270m, a folder")
    p.add_argument("--quantized", help="a quantized checkpoint folder of that model")
    p.add_argument("--bits", type=int, help="instead of --quantized: quantize on the fly with this many bits")
    add_quant_args(p)
    p.add_argument("--text-file", default="wiki", help="corpus: 'wiki' (embedded) or a path to a UTF-8 text file")
    p.add_argument("--seq-len", type=window_length, help="tokens per example (default 256; 128 with --fast)")
    p.add_argument("--calib-seq-len", type=window_length, default=512, help="GPTQ calibration window length")
    p.add_argument("--examples", type=positive_int, help="evaluation windows (default 64; 8 with --fast)")
    p.add_argument("--trace-examples", type=positive_int, help="examples for the signal trace and components (default 8)")
    p.add_argument("--patch-examples", type=nonnegative_int, help="of those, examples also patched, 0 to skip (default 2)")
    p.add_argument("--capture-examples", type=nonnegative_int, help="examples under the kernels' error capture (default 4)")
    p.add_argument("--compare", nargs="*", default=[], metavar="SPEC",
                   help="other quantizations for the per-example correlation: checkpoint folders or "
                        "METHOD:BITS:GROUP (e.g. rtn:3:64 gptq:4:64)")
    p.add_argument("--fast", action="store_true", help="a quick pass on little data (tests, smoke runs)")
    p.add_argument("--out", required=True, help="output folder for diagnosis.json and report.html")
    p.add_argument("--overwrite", action="store_true", help="replace an output folder bitcliff wrote")
    add_device_arg(p)
    p.set_defaults(func=run)


def parse_compare(spec: str, args: argparse.Namespace):
    """``(name, checkpoint folder)`` or ``(name, QuantConfig)`` for one ``--compare`` value."""
    from bitcliff.models import is_quantized_folder

    if Path(spec).exists():
        if not is_quantized_folder(spec):
            raise UsageError(f"--compare {spec}: not a bitcliff/GPTQ checkpoint folder "
                             "(no config.json with quantization_config.quant_method = 'gptq')")
        return Path(spec).name, Path(spec)
    parts = spec.split(":")
    if len(parts) != 3 or parts[0] not in ("rtn", "gptq") or not all(p.lstrip("-").isdigit() for p in parts[1:]):
        raise UsageError(f"--compare {spec!r}: expected a checkpoint folder or METHOD:BITS:GROUP, e.g. rtn:3:64")
    try:
        config = config_from_args(args, int(parts[1]), int(parts[2]), method=parts[0])
    except UsageError as exc:
        raise UsageError(f"--compare {spec}: {str(exc).split(': ', 1)[1]}") from None
    return config.describe(), config


def run(args: argparse.Namespace) -> int:
    from bitcliff.assets import load_text
    from bitcliff.data import evaluation_windows
    from bitcliff.device import describe
    from bitcliff.diagnosis.run import DiagnoseOptions, diagnose
    from bitcliff.models import is_quantized_folder, load_fp_model
    from bitcliff.quant.checkpoint import load

    if (args.quantized is None) == (args.bits is None):
        raise UsageError("pass either --quantized FOLDER or --bits N (with --method/--group-size) to quantize on the fly")
    config = config_from_args(args, args.bits, args.group_size) if args.bits is not None else None
    compare_specs = [parse_compare(spec, args) for spec in args.compare]
    check_model_arg(args.model)
    check_text_arg(args.text_file)
    if args.quantized is not None and not is_quantized_folder(args.quantized):
        raise UsageError(f"--quantized {args.quantized}: not a bitcliff/GPTQ checkpoint folder "
                         "(no config.json with quantization_config.quant_method = 'gptq')")
    options = DiagnoseOptions.fast() if args.fast else DiagnoseOptions()
    overrides = {k: getattr(args, k) for k in ("trace_examples", "patch_examples", "capture_examples")
                 if getattr(args, k) is not None}
    try:
        options = dataclasses.replace(options, **overrides)
    except ValueError as exc:
        raise UsageError(f"--{str(exc).split(' ', 1)[0].replace('_', '-')}: {exc}") from None
    out = Path(args.out)
    check_out(out, args.overwrite)

    fp_model, tokenizer, path = load_fp_model(args.model, device=args.device)
    if args.quantized is not None:
        q_model, name = load(args.quantized, device=args.device), Path(args.quantized).name
    else:
        q_model = quantize_on_text(copy.deepcopy(fp_model), tokenizer, config, args.text_file, args.calib_seq_len)
        name = config.describe()
    compare = {}
    for other, source in compare_specs:
        compare[other] = load(source, device=args.device) if isinstance(source, Path) else quantize_on_text(
            copy.deepcopy(fp_model), tokenizer, source, args.text_file, args.calib_seq_len)
    n_examples = args.examples if args.examples is not None else (8 if args.fast else 64)
    args.seq_len = args.seq_len if args.seq_len is not None else (128 if args.fast else 256)
    examples = evaluation_windows(tokenizer, load_text(args.text_file), n_examples, args.seq_len)
    start = time.perf_counter()
    report = diagnose(fp_model, q_model, examples, compare=compare, options=options, name=name)
    report.meta.update(model=args.model, quantized=args.quantized, text=args.text_file, seq_len=args.seq_len,
                       wall_seconds=round(time.perf_counter() - start, 1), device=describe(args.device))
    paths = report.save(out, overwrite=args.overwrite)
    print(report.summary())
    print(f"wrote {paths['json']} and {paths['html']}")
    return 0
