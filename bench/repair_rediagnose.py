"""Does repair move the verdict?  Diagnose quantized checkpoints before and after their repair.

    python -m bench.repair_rediagnose --pair runs/cliff/gptq-w3g64 runs/cliff/gptq-w3g64-repaired \\
        --pair runs/cliff/gptq-w2g64 runs/cliff/gptq-w2g64-repaired --out bench/results/repair-rediagnosis.json

Both checkpoints of a pair are diagnosed against the full-precision model with the repair
table's settings (16 Wikipedia windows of 256 tokens, 8 traced, no patching, 1 captured), so
the four indicators can be read side by side.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench.provenance import commit, now


def _summary(report: dict) -> dict:
    verdict = report["verdict"]
    return {"label": verdict["label"], "headline": report["headline"], "ppl_q": report["ppl_q"],
            "indicators": {i["name"]: {"value": i["value"], "fires": i["fires"]} for i in verdict["indicators"]}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--pair", nargs=2, action="append", required=True, metavar=("QUANTIZED", "REPAIRED"))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    import bitcliff
    from bitcliff.assets import load_text
    from bitcliff.data import evaluation_windows
    from bitcliff.models import load_fp_model
    from bitcliff.repairs.run import PLANNING_DIAGNOSIS

    fp, tokenizer, _ = load_fp_model(args.model)
    examples = evaluation_windows(tokenizer, load_text("wiki"), 16, 256)
    rows = []
    for quantized, repaired in args.pair:
        row = {"quantized": quantized, "repaired": repaired}
        for key, folder in (("before", quantized), ("after", repaired)):
            report = bitcliff.diagnose(fp, bitcliff.load(folder), examples, options=PLANNING_DIAGNOSIS,
                                       name=Path(folder).name, progress=False).to_dict()
            row[key] = _summary(report)
        repair_json = Path(repaired) / "repair.json"
        if repair_json.is_file():
            row["repair"] = {k: v for k, v in json.loads(repair_json.read_text()).items()
                             if k in ("bits_per_weight", "plan")}
        rows.append(row)
        print(f"{Path(quantized).name}: {row['before']['headline']}  ->  repaired: {row['after']['headline']}",
              flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "model": args.model, "commit": commit(short=True),
                                    "date": now()},
                                   indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
