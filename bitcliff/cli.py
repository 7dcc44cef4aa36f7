"""The ``bitcliff`` command line: assets, quantize, eval, sweep, diagnose."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

from bitcliff.quant.config import QuantConfig
from bitcliff.quant.surgery import quant_config


def _add_text_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--text-file", default="wiki", help="corpus: 'wiki' (embedded) or a path to a UTF-8 text file")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per window (default 512)")


def _add_quant_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", choices=["rtn", "gptq"], default="rtn")
    p.add_argument("--group-size", type=int, default=128, help="-1 for per-channel")
    p.add_argument("--sym", action="store_true", help="symmetric grid (default: asymmetric)")
    p.add_argument("--mse", action="store_true", help="search per-group clipping for minimal squared error")
    p.add_argument("--act-order", action="store_true", help="GPTQ: quantize columns by descending Hessian diagonal")
    p.add_argument("--static-groups", action="store_true", help="GPTQ: fit group grids before the solve")
    p.add_argument("--true-sequential", action="store_true", help="GPTQ: quantize sub-blocks in order")
    p.add_argument("--refit-rounds", type=int, default=0, metavar="R",
                   help="GPTQ: refit scales to the codes by least squares, re-solving R-1 more times (default 0)")
    p.add_argument("--damp", type=float, default=0.01, help="GPTQ: dampening as a fraction of mean diag(H)")
    p.add_argument("--calib-samples", type=int, default=64, help="GPTQ: calibration windows")


def _config(args: argparse.Namespace, bits: int, group_size: int) -> QuantConfig:
    return QuantConfig(
        bits=bits,
        group_size=group_size,
        sym=args.sym,
        method=args.method,
        mse=args.mse,
        damp_percent=args.damp,
        act_order=args.act_order,
        static_groups=args.static_groups,
        true_sequential=args.true_sequential,
        refit_rounds=args.refit_rounds,
        calib_samples=args.calib_samples,
    )


def _check_out(out: Path, overwrite: bool) -> None:
    """Refuse an occupied output folder before any work is done."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"{out} already exists and is not empty; pass --overwrite to replace it")


def _quantize_model(model, tokenizer, config: QuantConfig, text_name: str, seq_len: int):
    import bitcliff

    if config.method == "gptq":
        from bitcliff.assets import load_text
        from bitcliff.data import calibration_windows

        calib = calibration_windows(tokenizer, load_text(text_name), config.calib_samples, seq_len)
        return bitcliff.quantize(model, config, calib_ids=calib)
    return bitcliff.quantize(model, config)


def cmd_assets(args: argparse.Namespace) -> int:
    from bitcliff.assets import prepare_all

    paths = prepare_all(tuple(args.names))
    if args.json:
        print(json.dumps(paths, indent=2))
    else:
        for name, path in paths.items():
            print(f"{name:14s} {path}")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from bitcliff.models import load_fp_model
    from bitcliff.quant.checkpoint import save

    config = _config(args, args.bits, args.group_size)
    out = Path(args.out)
    _check_out(out, args.overwrite)
    if args.streaming:
        return _quantize_streaming(args, config, out)
    model, tokenizer, path = load_fp_model(args.model)
    start = time.perf_counter()
    _quantize_model(model, tokenizer, config, args.text_file, args.seq_len)
    seconds = time.perf_counter() - start
    save(model, out, tokenizer=tokenizer, overwrite=args.overwrite, checkpoint_format=args.checkpoint_format)
    print(f"quantized {path} with {config.describe()} in {seconds:.1f} s -> {out}")
    return 0


def _quantize_streaming(args: argparse.Namespace, config: QuantConfig, out: Path) -> int:
    """GPTQ one decoder layer at a time from the source safetensors; resumes an interrupted run."""
    from transformers import AutoTokenizer

    from bitcliff.assets import load_text, resolve_model
    from bitcliff.data import calibration_windows
    from bitcliff.quant.gptq_stream import quantize_gptq_streaming

    if config.method != "gptq":
        raise ValueError("--streaming is a GPTQ mode; pass --method gptq (RTN needs no calibration pass)")
    path = resolve_model(args.model)
    if not Path(path).is_dir():
        raise ValueError(f"--streaming reads a local safetensors folder; {args.model!r} resolved to {path}")
    tokenizer = AutoTokenizer.from_pretrained(path)
    calib = calibration_windows(tokenizer, load_text(args.text_file), config.calib_samples, args.seq_len)
    start = time.perf_counter()
    quantize_gptq_streaming(path, config, calib, out, overwrite=args.overwrite, resume=not args.restart,
                            checkpoint_format=args.checkpoint_format)
    print(f"quantized {path} with {config.describe()} (streaming) in {time.perf_counter() - start:.1f} s -> {out}")
    return 0


def _evaluate(model, tokenizer, text_name: str, windows: int, seq_len: int) -> dict:
    from bitcliff.assets import load_text
    from bitcliff.data import evaluation_windows
    from bitcliff.eval import evaluate_ppl

    ids = evaluation_windows(tokenizer, load_text(text_name), windows, seq_len)
    return evaluate_ppl(model, ids)


def cmd_eval(args: argparse.Namespace) -> int:
    from bitcliff.models import load_any

    model, tokenizer, path, quantized = load_any(args.target)
    result = _evaluate(model, tokenizer, args.text_file, args.windows, args.seq_len)
    config = quant_config(model)
    record = {
        "model": path,
        "quantized": quantized,
        "config": config.to_dict() if config else None,
        "text": args.text_file,
        "seq_len": args.seq_len,
        **result,
    }
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(record, indent=2))
    print(f"{path}: ppl {result['ppl']:.3f} over {result['tokens']} tokens ({result['windows']} windows)")
    return 0


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*.safetensors"))


def _write_rows(out_dir: Path, model_path: str, rows: list[dict]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / "sweep.json.tmp"
    tmp.write_text(json.dumps({"model": model_path, "rows": rows}, indent=2))
    tmp.replace(out_dir / "sweep.json")


def cmd_sweep(args: argparse.Namespace) -> int:
    """The main job: fp and quantized perplexities in one table (checkpoints saved and reloaded)."""
    from bitcliff.models import load_fp_model
    from bitcliff.quant.checkpoint import load, save

    fp_model, tokenizer, path = load_fp_model(args.model)
    out_dir = Path(args.out_dir)
    rows = [{"setting": "fp32", "bits_per_weight": 32.0, **_evaluate(fp_model, tokenizer, args.text_file, args.windows, args.seq_len)}]
    for group_size in args.group_sizes:
        for bits in args.bits:
            config = _config(args, bits, group_size)
            model = _quantize_model(copy.deepcopy(fp_model), tokenizer, config, args.text_file, args.seq_len)
            folder = out_dir / f"{Path(path).name}-{config.describe()}"
            save(model, folder, tokenizer=tokenizer, overwrite=True)
            del model
            reloaded = load(folder)  # evaluate what is on disk, not what is in memory
            result = _evaluate(reloaded, tokenizer, args.text_file, args.windows, args.seq_len)
            k = fp_model.config.hidden_size
            rows.append({
                "setting": config.describe(),
                "bits_per_weight": round(config.effective_bits(k), 3),
                "checkpoint": str(folder),
                "checkpoint_mb": round(_folder_bytes(folder) / 1e6, 1),
                **result,
            })
            _write_rows(out_dir, path, rows)  # after every row: a long sweep keeps what it measured
    _write_rows(out_dir, path, rows)
    print(f"\nperplexity of {path} on {args.text_file} ({rows[0]['windows']} windows x {args.seq_len} tokens)")
    print(f"{'setting':22s} {'bits/w':>7s} {'disk MB':>8s} {'ppl':>12s}")
    for row in rows:
        mb = f"{row['checkpoint_mb']:.1f}" if "checkpoint_mb" in row else "-"
        print(f"{row['setting']:22s} {row['bits_per_weight']:7.2f} {mb:>8s} {row['ppl']:12.2f}")
    return 0


def _compare_model(spec: str, fp_model, tokenizer, args: argparse.Namespace):
    """``METHOD:BITS:GROUP`` (quantized on the fly from ``fp_model``) or a checkpoint folder."""
    from bitcliff.models import is_quantized_folder
    from bitcliff.quant.checkpoint import load

    if Path(spec).exists():
        if not is_quantized_folder(spec):
            raise ValueError(f"--compare {spec}: not a bitcliff/GPTQ checkpoint folder "
                             "(no config.json with quantization_config.quant_method = 'gptq')")
        return Path(spec).name, load(spec)
    parts = spec.split(":")
    if len(parts) != 3 or parts[0] not in ("rtn", "gptq") or not all(p.lstrip("-").isdigit() for p in parts[1:]):
        raise ValueError(f"--compare {spec!r}: expected a checkpoint folder or METHOD:BITS:GROUP, e.g. rtn:3:64")
    config = dataclasses.replace(_config(args, int(parts[1]), int(parts[2])), method=parts[0])
    model = _quantize_model(copy.deepcopy(fp_model), tokenizer, config, args.text_file, args.calib_seq_len)
    return config.describe(), model


def cmd_diagnose(args: argparse.Namespace) -> int:
    """Diagnose a quantized model against its full-precision original; write JSON + HTML."""
    from bitcliff.assets import load_text
    from bitcliff.data import evaluation_windows
    from bitcliff.diagnosis.run import DiagnoseOptions, diagnose
    from bitcliff.models import is_quantized_folder, load_fp_model
    from bitcliff.quant.checkpoint import load

    if (args.quantized is None) == (args.bits is None):
        raise ValueError("pass either --quantized FOLDER or --bits N (with --method/--group-size) to quantize on the fly")
    out = Path(args.out)
    _check_out(out, args.overwrite)
    if args.quantized is not None and not is_quantized_folder(args.quantized):
        raise ValueError(f"--quantized {args.quantized}: not a bitcliff/GPTQ checkpoint folder "
                         "(no config.json with quantization_config.quant_method = 'gptq')")
    fp_model, tokenizer, path = load_fp_model(args.model)
    if args.quantized is not None:
        q_model, name = load(args.quantized), Path(args.quantized).name
    else:
        config = _config(args, args.bits, args.group_size)
        q_model = _quantize_model(copy.deepcopy(fp_model), tokenizer, config, args.text_file, args.calib_seq_len)
        name = config.describe()
    compare = dict(_compare_model(spec, fp_model, tokenizer, args) for spec in args.compare)
    options = DiagnoseOptions.fast() if args.fast else DiagnoseOptions()
    overrides = {k: getattr(args, k) for k in ("trace_examples", "patch_examples", "capture_examples")
                 if getattr(args, k) is not None}
    options = dataclasses.replace(options, **overrides)
    n_examples = args.examples if args.examples is not None else (8 if args.fast else 64)
    args.seq_len = args.seq_len if args.seq_len is not None else (128 if args.fast else 256)
    examples = evaluation_windows(tokenizer, load_text(args.text_file), n_examples, args.seq_len)
    start = time.perf_counter()
    report = diagnose(fp_model, q_model, examples, compare=compare, options=options, name=name)
    report.meta.update(model=args.model, quantized=args.quantized, text=args.text_file, seq_len=args.seq_len,
                       wall_seconds=round(time.perf_counter() - start, 1))
    paths = report.save(out, overwrite=args.overwrite)
    print(report.summary())
    print(f"wrote {paths['json']} and {paths['html']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bitcliff", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("assets", help="fetch and prepare the embedded model(s) and corpus, print their paths")
    p.add_argument("names", nargs="*", default=["default", "wiki"], help="assets: default, gemma3-270m, wiki")
    p.add_argument("--json", action="store_true", help="print a JSON object name -> path")
    p.set_defaults(func=cmd_assets)

    p = sub.add_parser("quantize", help="quantize a model and save a GPTQ-format checkpoint")
    p.add_argument("--model", default="default", help="default, gemma3-270m, a local HF folder or a hub id")
    p.add_argument("--bits", type=int, required=True, help="2, 3 or 4")
    _add_quant_args(p)
    _add_text_args(p)
    p.add_argument("--out", required=True, help="output checkpoint folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--checkpoint-format", default="auto", choices=["auto", "gptq", "gptq_v2"])
    p.add_argument("--streaming", action="store_true",
                   help="GPTQ one decoder layer at a time from the source files (models larger than memory); "
                        "an interrupted run resumes from its last finished layer")
    p.add_argument("--restart", action="store_true", help="with --streaming: discard a partial run and start over")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("eval", help="perplexity of a model or checkpoint (DESIGN §5 protocol)")
    p.add_argument("target", help="a checkpoint folder, default, gemma3-270m, a local HF folder or a hub id")
    p.add_argument("--windows", type=int, default=16)
    _add_text_args(p)
    p.add_argument("--json", help="write the result (ppl, per-window NLL, config) to this file")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("sweep", help="main job: fp vs quantized perplexity table over bits and group sizes")
    p.add_argument("--model", default="default")
    p.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2])
    p.add_argument("--group-sizes", type=int, nargs="+", default=[64])
    _add_quant_args(p)
    _add_text_args(p)
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--out-dir", default="runs/sweep", help="where checkpoints and sweep.json go")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("diagnose", help="why a quantized model breaks: degradation vs collapse, JSON + HTML report")
    p.add_argument("--model", default="default", help="the full-precision model: default, gemma3-270m, a folder")
    p.add_argument("--quantized", help="a quantized checkpoint folder of that model")
    p.add_argument("--bits", type=int, help="instead of --quantized: quantize on the fly with this many bits")
    _add_quant_args(p)
    p.add_argument("--text-file", default="wiki", help="corpus: 'wiki' (embedded) or a path to a UTF-8 text file")
    p.add_argument("--seq-len", type=int, help="tokens per example (default 256; 128 with --fast)")
    p.add_argument("--calib-seq-len", type=int, default=512, help="GPTQ calibration window length (default 512)")
    p.add_argument("--examples", type=int, help="evaluation windows (default 64; 8 with --fast)")
    p.add_argument("--trace-examples", type=int, help="examples for the signal trace and components (default 8)")
    p.add_argument("--patch-examples", type=int, help="examples for activation patching, 0 to skip (default 2)")
    p.add_argument("--capture-examples", type=int, help="examples under the kernels' error capture (default 4)")
    p.add_argument("--compare", nargs="*", default=[], metavar="SPEC",
                   help="other quantizations for the per-example correlation: checkpoint folders or "
                        "METHOD:BITS:GROUP (e.g. rtn:3:64 gptq:4:64)")
    p.add_argument("--fast", action="store_true", help="a quick pass on little data (tests, smoke runs)")
    p.add_argument("--out", required=True, help="output folder for diagnosis.json and report.html")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=cmd_diagnose)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, FileExistsError, FileNotFoundError, RuntimeError) as exc:
        print(f"bitcliff {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
