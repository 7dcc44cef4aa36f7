"""``bitcliff quantize``: quantize a model and save a GPTQ-format checkpoint.

GPTQ runs on several processes when started by torchrun (``torchrun --nproc-per-node N -m
bitcliff quantize ...``, with ``--nnodes`` for several machines), or with ``--nproc N``, which
starts torchrun on this machine; see :mod:`bitcliff.distributed`.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from bitcliff.cli.common import (
    HelpFormatter,
    UsageError,
    add_device_arg,
    add_quant_args,
    add_text_args,
    check_model_arg,
    check_out,
    check_text_arg,
    config_from_args,
    positive_float,
    positive_int,
    without_option,
)
from bitcliff.device import describe, peak_memory, reset_peak_memory
from bitcliff.distributed import DEFAULT_TIMEOUT_S, Ranks
from bitcliff.kernels.pack import SUPPORTED_BITS, widths_text
from bitcliff.quant.convert import quantize_on_text
from bitcliff.quant.mixed import GROUP_SIZES


def add_parser(sub) -> None:
    p = sub.add_parser("quantize", help="quantize a model and save a GPTQ-format checkpoint",
                       formatter_class=HelpFormatter)
    p.add_argument("--model", default="default", help="default, gemma3-270m, a local HF folder or a hub id")
    width = p.add_mutually_exclusive_group(required=True)
    width.add_argument("--bits", type=int, help=widths_text())
    width.add_argument("--avg-bits", type=positive_float, metavar="B",
                       help="mixed precision: each module's bits (2, 3, 4) and group size (32, 64, 128) chosen by "
                            "measured sensitivity, B stored bits per weight on average (scales and zeros counted; "
                            "W3 g64 stores 3.30)")
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
    add_device_arg(p)
    ranks = p.add_argument_group(
        "ranks", "GPTQ over several processes: the calibration batches are split among them, each module's\n"
        "Hessian is summed by one of them and every one solves a block of its rows.  Under torchrun\n"
        "the ranks come from its environment.")
    ranks.add_argument("--nproc", type=positive_int, default=1, metavar="N",
                       help="start N processes on this machine (through torchrun), each with its share of the cores")
    ranks.add_argument("--rank-timeout", type=positive_float, default=DEFAULT_TIMEOUT_S, metavar="SECONDS",
                       help="how long a rank waits for another before giving up with an error that names it")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from bitcliff.models import load_fp_model
    from bitcliff.quant.checkpoint import save

    config = config_from_args(args, args.bits or max(SUPPORTED_BITS), args.group_size)
    check_model_arg(args.model)
    check_text_arg(args.text_file)
    if args.avg_bits is not None and without_option(args.argv, "--group-size") != args.argv:
        raise UsageError(f"--avg-bits chooses each module's group size among {', '.join(map(str, GROUP_SIZES))}; "
                         "drop --group-size")
    if args.avg_bits is not None and args.streaming:
        raise UsageError("--avg-bits measures sensitivity by gradients through the whole model in memory; "
                         "it cannot run with --streaming")
    if config.method == "rtn" and args.avg_bits is None and args.text_file != "wiki":
        raise UsageError("--text-file is read only by GPTQ calibration and --avg-bits; RTN needs no text "
                         "(drop it or pass --method gptq)")
    if args.streaming and config.method != "gptq":
        raise UsageError("--streaming is a GPTQ mode; pass --method gptq (RTN needs no calibration pass)")
    if args.restart and not args.streaming:
        raise UsageError("--restart discards a partial --streaming run; it has no meaning without --streaming")
    under_torchrun = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if (args.nproc > 1 or under_torchrun) and config.method != "gptq":
        raise UsageError("several processes share GPTQ's calibration work; RTN needs none (drop --nproc / torchrun "
                         "or pass --method gptq)")
    if args.nproc > 1 and under_torchrun:
        raise UsageError("--nproc starts torchrun itself; under torchrun, drop --nproc")
    out = Path(args.out)
    check_out(out, args.overwrite)
    if args.nproc > 1:
        return _launch(args)
    ranks = Ranks.from_environment(args.rank_timeout, args.device)
    device = ranks.device if ranks.distributed else args.device
    reset_peak_memory(device)
    try:
        if args.streaming:
            return _quantize_streaming(args, config, out, ranks, device)
        model, tokenizer, path = load_fp_model(args.model, device=device)
        start = time.perf_counter()
        if args.avg_bits is not None:
            config = _choose_widths(model, tokenizer, config, args, ranks)
        quantize_on_text(model, tokenizer, config, args.text_file, args.seq_len, ranks)
        seconds = time.perf_counter() - start
        ranks.on_writer("writing the checkpoint", lambda: save(
            model, out, tokenizer=tokenizer, overwrite=args.overwrite, checkpoint_format=args.checkpoint_format))
        if ranks.writes:
            print(f"quantized {path} with {config.describe()}{_on(ranks)} on {_where(device)} in {seconds:.1f} s "
                  f"-> {out}")
        return 0
    finally:
        ranks.close()


def _choose_widths(model, tokenizer, config, args: argparse.Namespace, ranks: Ranks):
    """The mixed-precision config for ``--avg-bits``, chosen by rank 0 for every rank."""
    from bitcliff.assets import load_text
    from bitcliff.data import calibration_windows
    from bitcliff.quant.mixed import SENSITIVITY_WINDOWS, choose_widths

    def choose():
        calib = calibration_windows(tokenizer, load_text(args.text_file), SENSITIVITY_WINDOWS, args.seq_len)
        try:
            return choose_widths(model, config, args.avg_bits, calib, progress=True)
        except ValueError as exc:
            raise UsageError(f"--avg-bits: {exc}") from None

    mixed = ranks.on_writer("choosing each module's width", choose)
    if ranks.writes:
        print(f"mixed precision: {mixed.summary()}")
    return mixed.config


def _where(device) -> str:
    """The device, and the peak GPU memory of the run where there is one."""
    peak = peak_memory(device)
    return describe(device) + ("" if peak is None else f", peak {peak / 2**30:.2f} GiB allocated")


def _on(ranks: Ranks) -> str:
    if not ranks.distributed:
        return ""
    return f" on {ranks.world} ranks (rank 0 spent {ranks.exchange_s:.1f} s in exchanges)"


def _launch(args: argparse.Namespace) -> int:
    """Run this very command under torchrun with ``--nproc`` processes on this machine, each with
    its share of the cores; returns torchrun's exit status."""
    argv = without_option(args.argv, "--nproc")
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.nproc)))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
               "-m", "bitcliff", *argv]
    return subprocess.run(command, env=env, check=False).returncode


def _quantize_streaming(args: argparse.Namespace, config, out: Path, ranks: Ranks, device) -> int:
    """GPTQ one decoder layer at a time from the source safetensors; resumes an interrupted run."""
    from transformers import AutoTokenizer

    from bitcliff.assets import load_text, resolve_model
    from bitcliff.data import calibration_windows
    from bitcliff.quant.gptq_stream import layers_done, quantize_gptq_streaming

    path = resolve_model(args.model)
    if not Path(path).is_dir():
        raise UsageError(f"--streaming reads a local safetensors folder; {args.model!r} resolved to {path}")
    tokenizer = AutoTokenizer.from_pretrained(path)
    calib = calibration_windows(tokenizer, load_text(args.text_file), config.calib_samples, args.seq_len)
    work = out.parent / f"{out.name}.partial"

    def interrupted_hint() -> str:  # asked at the interruption, from what the work folder holds then
        done = layers_done(work)
        if done:
            return (f"the {done} finished layers are kept in {work}; run the same command again to resume from "
                    "there (--restart discards them)")
        return "no layer had finished, so there was nothing to keep"

    args.interrupted_hint = interrupted_hint
    start = time.perf_counter()
    quantize_gptq_streaming(path, config, calib, out, overwrite=args.overwrite, resume=not args.restart,
                            checkpoint_format=args.checkpoint_format, ranks=ranks, device=device)
    if ranks.writes:
        print(f"quantized {path} with {config.describe()} (streaming){_on(ranks)} on {_where(device)} in "
              f"{time.perf_counter() - start:.1f} s -> {out}")
    return 0
