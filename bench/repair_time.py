"""Repair time against GPTQ time, in one sitting: the issue's "repair ≤ 0.5x GPTQ" check.

    python -m bench.repair_time --bits 3 --out bench/results/repair-time.json

Times ``bitcliff.quantize`` (GPTQ at bitcliff's defaults: 64 calibration windows) and then
the repair of its result with the plan at ``--budget`` (its measuring pass included) from a
diagnosis of that quantization, on ``--repair-calib`` windows, back to back in one process with the machine's
threads; nothing is evaluated, so only the two computations are timed.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

from bench.provenance import commit, now


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--budget", type=float, default=0.25)
    parser.add_argument("--repair-calib", type=int, default=32)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    import torch

    import bitcliff
    from bitcliff.assets import load_text
    from bitcliff.data import calibration_windows, evaluation_windows
    from bitcliff.models import load_fp_model
    from bitcliff.repairs.run import diagnose_and_repair

    fp, tokenizer, _ = load_fp_model(args.model)
    config = bitcliff.QuantConfig(bits=args.bits, group_size=64, method="gptq")
    calib = calibration_windows(tokenizer, load_text("wiki"), config.calib_samples, 512)
    start = time.perf_counter()
    q = bitcliff.quantize(copy.deepcopy(fp), config, progress=False, calib_ids=calib)
    gptq_s = time.perf_counter() - start
    # Diagnosed untimed; the repair alone is timed (its own clock in the outcome).
    outcome = diagnose_and_repair(fp, q, calib[: args.repair_calib], args.budget,
                                  examples=evaluation_windows(tokenizer, load_text("wiki"), 16, 256))
    # the measuring pass of the allocator is part of the repair's cost
    measure_s = outcome.seconds.get("measure", 0.0)
    plan, result, repair_s = outcome.plan, outcome.result, outcome.seconds["repair"] + measure_s
    row = {"model": args.model, "bits": args.bits, "gptq_calib": config.calib_samples, "gptq_s": round(gptq_s, 1),
           "repair_calib": args.repair_calib, "budget": args.budget, "methods": list(plan.methods),
           "bits_spent": result.bits_per_weight, "repair_s": round(repair_s, 1), "measure_s": round(measure_s, 1),
           "allocation": plan.allocation["by"], "ratio": round(repair_s / gptq_s, 3),
           "threads": torch.get_num_threads(), "commit": commit(short=True),
           "date": now()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(row, indent=1))
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
