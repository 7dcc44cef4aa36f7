"""Do the same inputs break under different quantizations?  Per-window damage measured as the NLL
difference and as the KL divergence from full precision, correlated across methods.

    python -m bench.damage_correlation [--windows 64] [--seq-len 256] [--device cpu|cuda] [--out FILE]

Chang et al. report a correlation of 0.82 (average over 50 method pairs, 7-70B models) between
the per-example errors of different quantization methods; bitcliff measured 0.16-0.50 for ΔNLL on
SmolLM2 and Gemma-3 (docs/diagnosis.md).  This asks whether that is a property of the metric.
ΔNLL (the window's log-perplexity, quantized minus full precision) is a difference of two numbers
and can be small or negative where the model is damaged (a wrong prediction that happens to fit
the text); KL(P_fp ‖ P_q) measures the change of the whole next-token distribution and is never
negative.  On the embedded SmolLM2 and the tail of its Wikipedia sample, for RTN and GPTQ at 4, 3
and 2 bits (g64), a mixed-precision model (3.25 bits on average, RTN) and a repaired W3 RTN model
(a quarter of a bit, the default methods), it records each window's ΔNLL and KL (top-1024
predictions, ``divergence.evaluate_with_reference``), then the Pearson and Spearman correlation of
every pair of methods under each metric, and each metric's correlation with the full-precision
model's own per-window NLL (how much of the agreement is the text's difficulty).

Rows are written as each model finishes; a rerun with the same ``--out`` skips the models already
there.  One JSON file.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

from bench.kernels import RESULTS, environment

#: name -> how the model is made (see :func:`make_model`).
MODELS = ("rtn-w4", "gptq-w4", "rtn-w3", "gptq-w3", "mixed-3.25", "repaired-w3", "rtn-w2", "gptq-w2")


def make_model(name: str, fp_model, tokenizer, calib_ids: torch.Tensor):
    """The quantized model called ``name`` (of :data:`MODELS`), from a copy of ``fp_model``."""
    import bitcliff
    from bitcliff import QuantConfig
    from bitcliff.quant.convert import quantize_on_text
    from bitcliff.quant.mixed import choose_widths

    if name.startswith(("rtn-", "gptq-")):
        method, width = name.split("-")
        config = QuantConfig(bits=int(width[1:]), group_size=64, method=method)
        return quantize_on_text(copy.deepcopy(fp_model), tokenizer, config, "wiki", seq_len=calib_ids.shape[1])
    if name == "mixed-3.25":
        mixed = choose_widths(fp_model, QuantConfig(bits=3, group_size=64), 3.25, calib_ids)
        return bitcliff.quantize(copy.deepcopy(fp_model), mixed.config, progress=False)
    if name == "repaired-w3":
        from bitcliff.diagnosis.run import DiagnoseOptions

        q = bitcliff.quantize(copy.deepcopy(fp_model), QuantConfig(bits=3, group_size=64), progress=False)
        report = bitcliff.diagnose(fp_model, q, calib_ids[:8], options=DiagnoseOptions.fast(), progress=False)
        bitcliff.repair(fp_model, q, calib_ids, bitcliff.plan_repair(report, 0.25), progress=False)
        return q
    raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}")


def correlations(rows: list[dict], fp_nll: list[float]) -> dict:
    """Pearson and Spearman of every pair of rows under each metric, and of each row's metric with
    the full-precision per-window NLL."""
    from bitcliff.diagnosis import metrics

    out = {"pairs": [], "with_fp_difficulty": []}
    for metric, field in (("delta_nll", "log_ppl_diff_per_window"), ("kl", "kl_per_window")):
        for i, a in enumerate(rows):
            out["with_fp_difficulty"].append({"metric": metric, "model": a["model"],
                                              "pearson": metrics.pearson(a[field], fp_nll),
                                              "spearman": metrics.spearman(a[field], fp_nll)})
            for b in rows[i + 1:]:
                rho = metrics.spearman(a[field], b[field])
                out["pairs"].append({"metric": metric, "a": a["model"], "b": b["model"],
                                     "pearson": metrics.pearson(a[field], b[field]), "spearman": rho,
                                     "spearman_ci95": metrics.spearman_interval(rho, len(fp_nll))})
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--device", default="cpu", help="where the models run: cpu, cuda or cuda:N")
    parser.add_argument("--out", type=Path, default=RESULTS / "damage-correlation.json")
    args = parser.parse_args(argv)
    if args.out.is_dir() or not args.out.parent.is_dir():  # before minutes of quantization
        parser.error(f"--out {args.out}: must be a file in an existing folder")
    if args.windows < 5 or args.seq_len < 2:
        parser.error("--windows must be at least 5 and --seq-len at least 2")

    from bitcliff.assets import load_text
    from bitcliff.data import calibration_windows, evaluation_windows
    from bitcliff.device import DeviceError, resolve_device
    from bitcliff.divergence import evaluate_with_reference, reference_perplexity, reference_predictions
    from bitcliff.models import load_fp_model
    from bitcliff.storage import write_json

    try:
        device = resolve_device(args.device)
    except DeviceError as error:
        parser.error(f"--device: {error}")
    torch.manual_seed(0)
    fp_model, tokenizer, _ = load_fp_model("default", device=device)
    text = load_text("wiki")
    eval_ids = evaluation_windows(tokenizer, text, args.windows, args.seq_len)
    calib_ids = calibration_windows(tokenizer, text, 64, args.seq_len)
    reference = reference_predictions(fp_model, eval_ids, progress=False)
    fp_nll = reference.nll.mean(dim=1).double().tolist()
    # a rerun resumes only rows made the same way: another device computes other figures
    setup = {"windows": args.windows, "seq_len": args.seq_len, "device": device.type,
             "fp_ppl": reference_perplexity(reference)["ppl"]}
    done = json.loads(args.out.read_text()) if args.out.is_file() else {}
    rows = [r for r in done.get("rows", []) if done.get("setup") == setup]
    for name in args.models:
        if any(r["model"] == name for r in rows):
            continue
        model = make_model(name, fp_model, tokenizer, calib_ids)
        result = evaluate_with_reference(model, reference, progress=False)
        rows.append({"model": name, **{k: result[k] for k in (
            "ppl", "kl_mean", "same_top_pct", "kl_per_window", "log_ppl_diff_per_window")}})
        print(f"{name}: ppl {result['ppl']:.2f}, KL {result['kl_mean']:.4f}", flush=True)
        write_json(args.out, {"environment": environment(device.type), "setup": setup, "fp_nll_per_window": fp_nll,
                              "rows": rows})
    ordered = [r for name in MODELS for r in rows if r["model"] == name]
    write_json(args.out, {"environment": environment(device.type), "setup": setup, "fp_nll_per_window": fp_nll,
                          "rows": ordered, "correlation": correlations(ordered, fp_nll)})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
