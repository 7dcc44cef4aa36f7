"""Peak memory of GPTQ: whole model in memory vs streaming one decoder layer at a time.

Each mode runs in a fresh subprocess that quantizes the model and writes the checkpoint; the
subprocess reports its peak resident set size (``VmHWM`` from /proc/self/status, falling back to
``resource.getrusage``) and its resident size right after the imports, so the difference is what
the quantization itself needed.

Usage::

    python bench/gptq_memory.py --model default --bits 3 --calib-samples 64 \\
        --out bench/results/gptq_memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _peak_kib() -> int:
    return _status_kib("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def child(args: argparse.Namespace) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bitcliff.assets import load_text, resolve_model
    from bitcliff.data import calibration_windows
    from bitcliff.quant.checkpoint import save
    from bitcliff.quant.config import QuantConfig
    from bitcliff.quant.gptq_model import gptq_log, quantize_gptq, write_gptq_log
    from bitcliff.quant.gptq_stream import quantize_gptq_streaming

    path = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    calib = calibration_windows(tokenizer, load_text("wiki"), args.calib_samples)
    config = QuantConfig(bits=args.bits, group_size=args.group_size, method="gptq",
                         calib_samples=args.calib_samples, true_sequential=args.true_sequential)
    baseline = _status_kib("VmRSS") or 0
    start = time.perf_counter()
    if args.mode == "memory":
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        quantize_gptq(model, config, progress=False, calib_ids=calib)
        save(model, args.out_dir, tokenizer=tokenizer, checkpoint_format="gptq_v2")
        write_gptq_log(gptq_log(model), args.out_dir)
    else:
        quantize_gptq_streaming(path, config, calib, args.out_dir, progress=False, checkpoint_format="gptq_v2")
    seconds = time.perf_counter() - start
    print("RESULT " + json.dumps({
        "mode": args.mode, "peak_rss_mib": _peak_kib() / 1024, "rss_after_imports_mib": baseline / 1024,
        "seconds": seconds,
    }))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--bits", type=int, default=3)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--true-sequential", action="store_true")
    p.add_argument("--modes", nargs="+", default=["memory", "stream"], choices=["memory", "stream"])
    p.add_argument("--out", help="write the results to this JSON file")
    p.add_argument("--child", choices=["memory", "stream"], help=argparse.SUPPRESS)
    p.add_argument("--out-dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        args.mode = args.child
        child(args)
        return 0
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode in args.modes:
            cmd = [sys.executable, os.path.abspath(__file__), "--child", mode, "--out-dir", os.path.join(tmp, mode),
                   "--model", args.model, "--bits", str(args.bits), "--group-size", str(args.group_size),
                   "--calib-samples", str(args.calib_samples)] + (["--true-sequential"] if args.true_sequential else [])
            proc = subprocess.run(cmd, capture_output=True, text=True)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                raise RuntimeError(f"{mode} run failed:\n{proc.stderr[-3000:]}")
            res = json.loads(lines[-1][len("RESULT "):])
            res["checkpoint_mib"] = sum(f.stat().st_size for f in Path(tmp, mode).glob("*.safetensors")) / 2**20
            results.append(res)
            print(f"{mode:7s} peak RSS {res['peak_rss_mib']:8.0f} MiB (after imports {res['rss_after_imports_mib']:.0f} MiB)"
                  f"  {res['seconds']:7.1f} s  checkpoint {res['checkpoint_mib']:.0f} MiB", flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"settings": vars(args), "results": results}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
