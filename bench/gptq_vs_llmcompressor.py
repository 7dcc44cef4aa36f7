"""bitcliff GPTQ vs llm-compressor GPTQ: perplexity and whole-model quantization time.

Both quantize the same model with the same calibration windows (docs/architecture.md protocol: the first 1M
characters of the corpus, 512-token windows, the first ``--calib-samples``) and the same
settings (group size, asymmetric integer grid, dampening 0.01, block 128, no act-order, output
head left in full precision), and both are scored by the same evaluation (the first 16
512-token windows of the last 400k characters, ppl = exp(mean token NLL)).

llm-compressor runs in its own virtual environment, as a subprocess of this script: pass that
environment's python with ``--peer-python``.  The subprocess runs this very file with
``--worker`` (that mode imports only torch, transformers and llm-compressor) and reports JSON.

The two differ in one algorithmic detail, reported beside the numbers: llm-compressor fits each
group's scale and zero point on the *original* weights before the solve (what bitcliff calls
``static_groups``), while bitcliff's plain GPTQ fits them when the solve reaches the group, on
the error-updated weights (as the GPTQ paper does).  ``--variants`` selects bitcliff's runs:
``plain``, ``static`` (static groups: the peer's exact algorithm), ``ts`` (true-sequential),
``ts+static``, and with the least-squares scale refit ``ts+refit``, ``ts+static+refit`` (one
round) and ``ts+refit3``, ``ts+static+refit3`` (three rounds).

Usage::

    python bench/gptq_vs_llmcompressor.py --peer-python /path/to/peer-venv/bin/python \\
        --bits 4 3 2 --variants plain ts --out bench/results/gptq_vs_llmcompressor.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _cpu_seconds() -> float:
    """User + system CPU time of this process, all threads (less sensitive than wall time to
    other programs sharing the cores)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _window_ppl(model, eval_ids) -> dict:
    """exp(mean token NLL) over windows, each window's NLL the mean over its T-1 predictions."""
    import torch
    import torch.nn.functional as F

    nll = []
    with torch.inference_mode():
        for row in eval_ids:
            ids = row[None]
            logits = model(input_ids=ids).logits.float()
            nll.append(F.cross_entropy(logits[0, :-1], ids[0, 1:]).double().item())
    mean = sum(nll) / len(nll)
    return {"ppl": math.exp(mean), "mean_nll": mean, "nll_per_window": nll}


# ----------------------------------------------------------------------------- peer worker


def worker(args: argparse.Namespace) -> None:
    """Runs inside the llm-compressor environment: quantize, time, evaluate, print JSON."""
    import torch
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = load_file(args.data)
    calib, eval_ids = data["calib"], data["eval"]
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    dataset = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
    weights = QuantizationArgs(
        num_bits=args.bits[0], type="int", symmetric=args.sym, strategy="group",
        group_size=args.group_size, actorder=None,
    )
    recipe = GPTQModifier(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
        ignore=["lm_head"], block_size=128, dampening_frac=args.damp, actorder=None,
    )
    start, cpu = time.perf_counter(), _cpu_seconds()
    oneshot(
        model=model, tokenizer=tokenizer, dataset=dataset, recipe=recipe,
        num_calibration_samples=calib.shape[0], max_seq_length=calib.shape[1],
        shuffle_calibration_samples=False, batch_size=args.peer_batch_size, pipeline="sequential",
    )
    seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
    result = {"seconds": seconds, "cpu_seconds": cpu, **_window_ppl(model, eval_ids),
              "torch_threads": torch.get_num_threads()}
    import llmcompressor

    result["version"] = llmcompressor.__version__
    print("RESULT " + json.dumps(result))


# ----------------------------------------------------------------------------- main


def _run_peer(args, data_path: str, model_path: str, bits: int) -> dict:
    cmd = [
        args.peer_python, os.path.abspath(__file__), "--worker", "--data", data_path, "--model", model_path,
        "--bits", str(bits), "--group-size", str(args.group_size), "--damp", str(args.damp),
        "--peer-batch-size", str(args.peer_batch_size),
    ] + (["--sym"] if args.sym else [])
    env = {**os.environ, "PYTHONPATH": ""}
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"llm-compressor run failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def _ours(model_path: str, calib, eval_ids, config, batch_size: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from bitcliff.quant.gptq_model import gptq_log, quantize_gptq

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    start, cpu = time.perf_counter(), _cpu_seconds()
    quantize_gptq(model, config, progress=False, calib_ids=calib, batch_size=batch_size)
    seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
    fallbacks = [e.module for e in gptq_log(model) if e.fallback]
    return {"seconds": seconds, "cpu_seconds": cpu, **_window_ppl(model, eval_ids), "rtn_fallbacks": fallbacks}


def _rtn(model_path: str, eval_ids, config) -> dict:
    import dataclasses

    import torch
    from transformers import AutoModelForCausalLM

    from bitcliff.quant.convert import quantize

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    start, cpu = time.perf_counter(), _cpu_seconds()
    quantize(model, dataclasses.replace(config, method="rtn"), progress=False)
    return {"seconds": time.perf_counter() - start, "cpu_seconds": _cpu_seconds() - cpu, **_window_ppl(model, eval_ids)}


VARIANTS = {
    "plain": {},
    "static": {"static_groups": True},
    "ts": {"true_sequential": True},
    "ts+static": {"true_sequential": True, "static_groups": True},
    "ts+refit": {"true_sequential": True, "refit_rounds": 1},
    "ts+static+refit": {"true_sequential": True, "static_groups": True, "refit_rounds": 1},
    "ts+refit3": {"true_sequential": True, "refit_rounds": 3},
    "ts+static+refit3": {"true_sequential": True, "static_groups": True, "refit_rounds": 3},
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--peer-python", help="python of the virtual environment with llmcompressor installed")
    p.add_argument("--model", default="default", help="default, gemma3-270m or a model folder")
    p.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2])
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--sym", action="store_true", help="symmetric grids (default asymmetric)")
    p.add_argument("--damp", type=float, default=0.01)
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--text-file", default="wiki")
    p.add_argument("--variants", nargs="+", default=["plain", "ts"], choices=sorted(VARIANTS))
    p.add_argument("--batch-size", type=int, default=8, help="bitcliff: calibration windows per layer forward")
    p.add_argument("--peer-batch-size", type=int, default=1, help="llm-compressor: calibration batch size")
    p.add_argument("--threads", type=int, help="intra-op CPU threads for both (default: torch's default). "
                   "One thread makes CPU time comparable on a machine shared with other work")
    p.add_argument("--skip-peer", action="store_true")
    p.add_argument("--skip-rtn", action="store_true")
    p.add_argument("--out", help="write all results to this JSON file")
    p.add_argument("--markdown", metavar="JSON", help="only print the markdown table of a results file")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    if args.markdown:
        print(markdown_table(json.loads(Path(args.markdown).read_text())))
        return 0
    if not args.skip_peer and not args.peer_python:
        p.error("--peer-python is required (or --skip-peer)")

    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.threads:
        torch.set_num_threads(args.threads)

    from bitcliff.assets import load_text, resolve_model
    from bitcliff.data import calibration_windows, evaluation_windows
    from bitcliff.quant.config import QuantConfig

    model_path = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    text = load_text(args.text_file)
    calib = calibration_windows(tokenizer, text, args.calib_samples, args.seq_len)
    eval_ids = evaluation_windows(tokenizer, text, args.eval_windows, args.seq_len)
    fp = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    record = {
        "model": args.model, "group_size": args.group_size, "sym": args.sym,
        "damp": args.damp, "calib_windows": list(calib.shape), "eval_windows": list(eval_ids.shape),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.processor(),
        "date": time.strftime("%Y-%m-%d %H:%M"), "fp": _window_ppl(fp, eval_ids), "rows": [],
    }
    del fp
    print(f"fp32 ppl {record['fp']['ppl']:.3f}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        data_path = os.path.join(tmp, "windows.safetensors")
        save_file({"calib": calib.contiguous(), "eval": eval_ids.contiguous()}, data_path)
        for bits in args.bits:
            base = QuantConfig(
                bits=bits, group_size=args.group_size, sym=args.sym, method="gptq",
                damp_percent=args.damp, calib_samples=args.calib_samples,
            )
            runs = []
            if not args.skip_rtn:
                runs.append(("bitcliff rtn", lambda base=base: _rtn(model_path, eval_ids, base)))
            if not args.skip_peer:
                runs.append(("llm-compressor gptq", lambda bits=bits: _run_peer(args, data_path, model_path, bits)))
            for v in args.variants:
                import dataclasses

                cfg = dataclasses.replace(base, **VARIANTS[v])
                runs.append((f"bitcliff gptq {v}", lambda cfg=cfg: _ours(model_path, calib, eval_ids, cfg, args.batch_size)))
            for name, fn in runs:
                res = fn()
                row = {"bits": bits, "method": name, **res}
                record["rows"].append(row)
                row["load_avg_1min"] = os.getloadavg()[0]
                print(f"W{bits} g{args.group_size} {name:24s} ppl {res['ppl']:12.3f}  {res['seconds']:7.1f} s wall"
                      f"  {res['cpu_seconds']:7.1f} s cpu  load {row['load_avg_1min']:.1f}", flush=True)
                if args.out:  # after every row: a long comparison keeps what it measured
                    _write_json(Path(args.out), record)
    _print_table(record)
    return 0


def _write_json(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(path)


def markdown_table(record: dict) -> str:
    """The results as a markdown table: ppl, wall and CPU seconds, and ratios to the peer."""
    lines = [f"fp32 ppl {record['fp']['ppl']:.3f}; g{record['group_size']} {'sym' if record['sym'] else 'asym'}; "
             f"calibration {record['calib_windows']}, evaluation {record['eval_windows']}; torch {record['torch']}, "
             f"{record['threads']} thread(s)", "",
             "| bits | method | ppl | wall s | CPU s | wall / peer | CPU / peer |", "|---|---|---:|---:|---:|---:|---:|"]
    for bits in sorted({r["bits"] for r in record["rows"]}, reverse=True):
        rows = [r for r in record["rows"] if r["bits"] == bits]
        peer = next((r for r in rows if r["method"].startswith("llm-compressor")), None)
        for r in rows:
            ratio = peer is not None and "gptq" in r["method"] and r is not peer
            wall = f"{r['seconds'] / peer['seconds']:.2f}x" if ratio else ""
            cpu = f"{r['cpu_seconds'] / peer['cpu_seconds']:.2f}x" if ratio else ""
            ppl = f"{r['ppl']:.4g}" if r["ppl"] >= 1000 else f"{r['ppl']:.2f}"
            lines.append(f"| W{bits} | {r['method']} | {ppl} | {r['seconds']:.1f} | {r['cpu_seconds']:.1f} | {wall} | {cpu} |")
    return "\n".join(lines)


def _print_table(record: dict) -> None:
    print(f"\n{record['model']}: fp32 ppl {record['fp']['ppl']:.3f}; g{record['group_size']} "
          f"{'sym' if record['sym'] else 'asym'}; calib {record['calib_windows']}, eval {record['eval_windows']}")
    print(f"{'bits':>4s}  {'method':26s} {'ppl':>12s} {'wall s':>8s} {'cpu s':>8s} {'wall/peer':>10s} {'cpu/peer':>9s}")
    for bits in sorted({r["bits"] for r in record["rows"]}, reverse=True):
        rows = [r for r in record["rows"] if r["bits"] == bits]
        peer = next((r for r in rows if r["method"].startswith("llm-compressor")), None)
        for r in rows:
            wall = f"{r['seconds'] / peer['seconds']:.2f}x" if peer and "gptq" in r["method"] else ""
            cpu = f"{r['cpu_seconds'] / peer['cpu_seconds']:.2f}x" if peer and "gptq" in r["method"] else ""
            print(f"{bits:>4d}  {r['method']:26s} {r['ppl']:12.3f} {r['seconds']:8.1f} {r['cpu_seconds']:8.1f} "
                  f"{wall:>10s} {cpu:>9s}")


if __name__ == "__main__":
    sys.exit(main())
