"""How much KL divergence the main job's compact full-precision predictions miss.

    python -m bench.kl_top_k [--bits 4 3 2] [--windows 4] [--top-k 16 64 256 1024] [--device cpu|cuda]
                             [--out FILE]

The main job keeps, per position, the full-precision model's ``k`` most likely tokens and counts
the rest of the vocabulary as one outcome (``divergence.ReferencePredictions``); KL over those
``k + 1`` outcomes bounds the full-vocabulary KL from below.  This measures the gap on the
embedded SmolLM2 and its Wikipedia sample (RTN g64 at each width, the first ``--windows``
evaluation windows of 512 tokens): the full-vocabulary KL (``divergence.evaluate_against``) beside
the bucketed one for each ``k``, as the mean and the worst token's shortfall, and the bytes kept
per position.  One JSON file of rows.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

from bench.kernels import RESULTS, environment


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2])
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--top-k", type=int, nargs="+", default=[16, 64, 256, 1024])
    parser.add_argument("--device", default="cpu", help="where the models run: cpu, cuda or cuda:N")
    parser.add_argument("--out", type=Path, default=RESULTS / "kl-top-k.json")
    args = parser.parse_args(argv)
    if args.out.is_dir() or not args.out.parent.is_dir():  # before minutes of forwards
        parser.error(f"--out {args.out}: must be a file in an existing folder")
    if any(k < 1 for k in args.top_k) or args.windows < 1:
        parser.error("--top-k and --windows must be positive")

    import bitcliff
    from bitcliff import QuantConfig
    from bitcliff.assets import load_text
    from bitcliff.data import evaluation_windows
    from bitcliff.divergence import (
        bucketed_divergence,
        evaluate_against,
        evaluate_with_reference,
        reference_predictions,
        token_divergence,
    )
    from bitcliff.models import load_fp_model

    from bitcliff.device import resolve_device

    device = resolve_device(args.device)
    fp_model, tokenizer, _ = load_fp_model("default", device=device)
    eval_ids = evaluation_windows(tokenizer, load_text("wiki"), args.windows, 512)
    predictions = {k: reference_predictions(fp_model, eval_ids, top_k=k, progress=False) for k in args.top_k}
    rows = []
    for bits in args.bits:
        model = bitcliff.quantize(copy.deepcopy(fp_model), QuantConfig(bits=bits, group_size=64), progress=False)
        exact = evaluate_against(model, fp_model, eval_ids, progress=False)
        with torch.inference_mode():
            ids = eval_ids.to(device)
            fp_logits, q_logits = fp_model(input_ids=ids).logits.cpu(), model(input_ids=ids).logits.cpu()
        exact_tokens, _ = token_divergence(fp_logits, q_logits)
        for k, kept in predictions.items():
            bucketed = evaluate_with_reference(model, kept, progress=False)
            tokens, _ = bucketed_divergence(kept.top_logprobs, kept.top_ids, kept.rest_logprob, q_logits)
            row = {"bits": bits, "group_size": 64, "top_k": k, "kl_mean_full": exact["kl_mean"],
                   "kl_mean_kept": bucketed["kl_mean"],
                   "relative_shortfall_of_mean": 1 - bucketed["kl_mean"] / exact["kl_mean"],
                   "worst_token_shortfall_nats": float((exact_tokens - tokens).max()),
                   "same_top_equal": bucketed["same_top_pct"] == exact["same_top_pct"],
                   "bytes_per_position": k * (4 + 4)}
            rows.append(row)
            print(f"W{bits} k={k:5d}: KL {row['kl_mean_kept']:.5f} of {row['kl_mean_full']:.5f} "
                  f"({100 * row['relative_shortfall_of_mean']:.3f} % short; worst token "
                  f"{row['worst_token_shortfall_nats']:.2e} nats)", flush=True)
    result = {"environment": environment(device.type), "windows": args.windows, "tokens_per_window": 512,
              "vocabulary": int(fp_logits.shape[-1]), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
