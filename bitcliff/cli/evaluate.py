"""``bitcliff eval`` (perplexity of one model) and ``bitcliff sweep`` (a table over bits and group sizes)."""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

from bitcliff.cli.common import (
    HelpFormatter,
    UsageError,
    add_device_arg,
    add_quant_args,
    add_text_args,
    check_file_out,
    check_location,
    check_model_arg,
    check_out,
    check_text_arg,
    config_from_args,
    positive_int,
)
from bitcliff.device import describe
from bitcliff.eval import evaluate_text
from bitcliff.quant.convert import quantize_on_text


def add_parsers(sub) -> None:
    p = sub.add_parser("eval", help="perplexity of a model or checkpoint (docs/architecture.md: evaluation protocol)",
                       formatter_class=HelpFormatter)
    p.add_argument("target", help="a checkpoint folder, default, gemma3-270m, a local HF folder or a hub id")
    p.add_argument("--windows", type=positive_int, default=16, help="evaluation windows")
    add_text_args(p)
    p.add_argument("--against", metavar="MODEL",
                   help="the checkpoint's full-precision source (default, a local HF folder or a hub id): also "
                        "report the KL divergence of the next-token distributions from it and the share of the "
                        "same top token, per token, as llama.cpp defines them")
    add_reference_cache_args(p)
    p.add_argument("--json", help="write the result (ppl, per-window NLL, config) to this file")
    p.add_argument("--overwrite", action="store_true", help="replace a --json file bitcliff wrote")
    add_device_arg(p)
    p.set_defaults(func=run_eval)

    p = sub.add_parser("sweep", help="fp vs quantized perplexity table over bits and group sizes, with each "
                       "checkpoint's KL divergence from the fp model and same-top-token share",
                       formatter_class=HelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2])
    p.add_argument("--group-sizes", "--group-size", dest="group_sizes", type=int, nargs="+", default=[64],
                   help="input channels per scale and zero, one checkpoint each; -1 for per-channel")
    add_quant_args(p, group_size=False)
    add_text_args(p)
    p.add_argument("--windows", type=positive_int, default=16, help="evaluation windows")
    add_reference_cache_args(p)
    p.add_argument("--out-dir", default="runs/sweep", help="where checkpoints and sweep.json go")
    p.add_argument("--overwrite", action="store_true", help="replace checkpoints and a sweep.json bitcliff wrote")
    add_device_arg(p)
    p.set_defaults(func=run_sweep)


def add_reference_cache_args(p: argparse.ArgumentParser) -> None:
    """Where the full-precision model's predictions are kept between runs (bitcliff.reference_cache)."""
    where = p.add_mutually_exclusive_group()
    where.add_argument("--reference-cache", metavar="DIR",
                       help="where the full-precision model's next-token predictions are kept, so that the next "
                            "checkpoint of the same model on the same windows is measured without running it "
                            "again (the 1024 most likely tokens per position, about 8 KB; KL over them and the "
                            "rest as one outcome is a lower bound of the full-vocabulary KL, measured 1.7-3.2 %% "
                            "below it on SmolLM2 at W4-W2; default: the reference folder of bitcliff's cache, "
                            "$BITCLIFF_CACHE or ~/.cache/bitcliff)")
    where.add_argument("--no-reference-cache", action="store_true",
                       help="compute the full-precision predictions afresh and keep nothing (eval --against then "
                            "runs both models side by side and compares over the full vocabulary: exact KL)")


def _reference_cache_dir(args: argparse.Namespace) -> Path | None:
    """The --reference-cache folder, checked writable before any model is loaded; None for the
    default one."""
    if args.reference_cache is None:
        return None
    check_location(args.reference_cache, "--reference-cache", renamed=False)
    return Path(args.reference_cache)


def run_eval(args: argparse.Namespace) -> int:
    from bitcliff.models import load_any
    from bitcliff.quant.surgery import quant_config
    from bitcliff.storage import write_output

    check_model_arg(args.target, flag="eval")
    if args.against:
        check_model_arg(args.against, flag="--against")
    elif args.reference_cache is not None or args.no_reference_cache:
        raise UsageError("--reference-cache and --no-reference-cache apply to eval --against MODEL only")
    cache_dir = _reference_cache_dir(args)
    check_text_arg(args.text_file)
    if args.json:
        check_file_out(args.json, args.overwrite, "--json")
    model, tokenizer, path, quantized = load_any(args.target, device=args.device)
    if args.against:
        result = _against(model, tokenizer, args, cache_dir)
    else:
        result = evaluate_text(model, tokenizer, args.text_file, args.windows, args.seq_len)
    config = quant_config(model)
    record = {
        "model": path,
        "quantized": quantized,
        "device": describe(args.device),
        "dtype": str(next(model.parameters()).dtype),
        "config": config.to_dict() if config else None,
        "text": args.text_file,
        "seq_len": args.seq_len,
        **result,
    }
    if args.json:
        write_output(args.json, record, args.overwrite, kind="eval")
    print(f"{path}: ppl {result['ppl']:.3f} over {result['tokens']} tokens ({result['windows']} windows) on "
          f"{describe(args.device)}")
    if args.against:
        interval = result["kl_mean_ci95"]
        spread = f" [{interval[0]:.4f}, {interval[1]:.4f}]" if interval else ""
        print(f"against {args.against} (ppl {result['ppl_fp']:.3f}, Δppl {result['delta_ppl']:+.3f}): KL mean "
              f"{result['kl_mean']:.4f}{spread}, median {result['kl_median']:.4f}, p99 {result['kl_p99']:.4f}, "
              f"p99.9 {result['kl_p999']:.4f}, max {result['kl_max']:.4f} nats; same top token "
              f"{result['same_top_pct']:.2f} %")
    return 0


def _against(model, tokenizer, args: argparse.Namespace, cache_dir: Path | None) -> dict:
    """Perplexity and divergence from the ``--against`` model on the evaluation windows
    (``cache_dir``: where its predictions are kept, None for the default)."""
    from bitcliff.assets import load_text
    from bitcliff.data import evaluation_windows
    from bitcliff.divergence import check_same_source, evaluate_against, evaluate_with_reference
    from bitcliff.models import load_fp_model
    from bitcliff.reference_cache import cached_reference_predictions

    reference, _, _ = load_fp_model(args.against, device=args.device)
    try:
        check_same_source(model, reference)
    except ValueError as error:
        raise UsageError(str(error)) from None
    ids = evaluation_windows(tokenizer, load_text(args.text_file), args.windows, args.seq_len)
    if args.no_reference_cache:
        return {**evaluate_against(model, reference, ids), "kl_over": "the full vocabulary"}
    predictions = cached_reference_predictions(reference, ids, cache_dir=cache_dir)
    kept = predictions.top_ids.shape[-1]
    return {**evaluate_with_reference(model, predictions),
            "kl_over": f"the reference's {kept} most likely tokens and the rest as one outcome"}


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*.safetensors"))


def run_sweep(args: argparse.Namespace) -> int:
    """fp and quantized perplexities in one table (checkpoints saved and reloaded), with each
    checkpoint's KL divergence from the fp model and its share of the same top token."""
    from bitcliff.assets import load_text
    from bitcliff.data import evaluation_windows
    from bitcliff.divergence import evaluate_with_reference, reference_perplexity, reference_predictions
    from bitcliff.models import load_fp_model
    from bitcliff.reference_cache import cached_reference_predictions
    from bitcliff.quant.checkpoint import load, save
    from bitcliff.storage import write_output

    configs = [config_from_args(args, bits, group, flags={"group_size": "--group-sizes"})
               for group in args.group_sizes for bits in args.bits]
    check_model_arg(args.model)
    check_text_arg(args.text_file)
    check_location(args.out_dir, "--out-dir", renamed=False)
    cache_dir = _reference_cache_dir(args)
    out_dir = Path(args.out_dir)
    check_file_out(out_dir / "sweep.json", args.overwrite, "--out-dir")
    fp_model, tokenizer, path = load_fp_model(args.model, device=args.device)
    folders = [out_dir / f"{Path(path).name}-{config.describe()}" for config in configs]
    for folder in folders:  # every output checked before any is written
        check_out(folder, args.overwrite, "--out-dir")
    written = False

    def save_rows() -> None:  # a long sweep keeps what it measured
        nonlocal written
        write_output(out_dir / "sweep.json", {"model": path, "rows": rows}, args.overwrite or written, kind="sweep")
        written = True
    eval_ids = evaluation_windows(tokenizer, load_text(args.text_file), args.windows, args.seq_len)
    # its forward passes are the fp evaluation
    reference = (reference_predictions(fp_model, eval_ids) if args.no_reference_cache else
                 cached_reference_predictions(fp_model, eval_ids, cache_dir=cache_dir))
    rows = [{"setting": "fp32", "bits_per_weight": 32.0, **reference_perplexity(reference),
             "tokens": reference.nll.numel(), "windows": reference.nll.shape[0]}]
    for config, folder in zip(configs, folders):
        model = quantize_on_text(copy.deepcopy(fp_model), tokenizer, config, args.text_file, args.seq_len)
        save(model, folder, tokenizer=tokenizer, overwrite=args.overwrite)
        del model
        reloaded = load(folder, device=args.device)  # evaluate what is on disk, not what is in memory
        result = evaluate_with_reference(reloaded, reference)
        k = fp_model.config.hidden_size
        rows.append({
            "setting": config.describe(),
            "bits_per_weight": round(config.effective_bits(k), 3),
            "checkpoint": str(folder),
            "checkpoint_mb": round(_folder_bytes(folder) / 1e6, 1),
            **result,
        })
        save_rows()
    save_rows()
    print(f"\nperplexity of {path} on {args.text_file} ({rows[0]['windows']} windows x {args.seq_len} tokens)")
    print(f"{'setting':22s} {'bits/w':>7s} {'disk MB':>8s} {'ppl':>12s} {'KL mean':>9s} {'same top':>9s}")
    for row in rows:
        mb = f"{row['checkpoint_mb']:.1f}" if "checkpoint_mb" in row else "-"
        kl = f"{row['kl_mean']:9.4f}" if "kl_mean" in row else f"{'-':>9s}"
        top = f"{row['same_top_pct']:8.2f}%" if "same_top_pct" in row else f"{'-':>9s}"
        print(f"{row['setting']:22s} {row['bits_per_weight']:7.2f} {mb:>8s} {row['ppl']:12.2f} {kl} {top}")
    return 0
