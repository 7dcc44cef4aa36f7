"""Does the fitted law predict configurations outside its sweep?  Measure them and compare.

    python -m bench.study_holdout --law runs/study/law.json --heldout runs/study-heldout \\
        --config default rtn 3 96 --config default gptq 3 64 24 --out bench/results/study-holdout.json

Each ``--config MODEL METHOD BITS GROUP [CALIB]`` is measured by the study sweep into
``--heldout`` (a sweep folder of its own, with the law's sweep settings, resumable), then
predicted by the law; a row says whether the measured perplexity and every stratum's damage lie
inside the law's intervals.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import sys
import warnings
from pathlib import Path

from bench.repair_table import _commit


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--law", type=Path, required=True)
    parser.add_argument("--heldout", type=Path, required=True)
    parser.add_argument("--config", nargs="+", action="append", required=True, metavar="FIELD")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    from bitcliff.quant.config import QuantConfig
    from bitcliff.study.fit import load_law
    from bitcliff.study.law import factors_of, predict
    from bitcliff.study.sweep import Configuration as C
    from bitcliff.study.sweep import SweepSettings, damages, run_sweep

    law, fits = load_law(args.law)
    held = json.loads((args.law.parent / "sweep.json").read_text())
    settings = SweepSettings(**{**held, "strata": tuple(held["strata"])})
    configs = []
    for fields in args.config:
        model, method, bits, group = fields[0], fields[1], int(fields[2]), int(fields[3])
        calib = int(fields[4]) if len(fields) > 4 else None
        configs += [C(model, "fp"), C(model, method, bits, group, calib)]
    rows = damages(run_sweep(args.heldout, list(dict.fromkeys(configs)), settings))
    results = []
    for row in rows:
        model = law["models"][row["model"]]
        factors = factors_of(row)
        checks = {}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for fit in fits.values():
                if fit.method != row["method"]:
                    continue
                p = predict(fit, factors, model["nll_fp"].get(fit.stratum))
                measured = row["damage"][fit.stratum]
                checks[fit.stratum] = {"damage": measured, "predicted": p.damage, "interval": p.damage_interval,
                                       "inside": p.damage_interval[0] <= measured <= p.damage_interval[1]}
                if p.ppl is not None:
                    ppl = math.exp(row["nll"]["overall"])
                    checks[fit.stratum].update(ppl=ppl, ppl_predicted=p.ppl, ppl_interval=p.ppl_interval)
        config = QuantConfig(bits=row["bits"], group_size=row["group_size"], method=row["method"])
        results.append({"model": row["model"], "config": config.describe(), "calib": row.get("calib"),
                        "checks": checks, "warnings": sorted({str(w.message) for w in caught})})
        print(json.dumps(results[-1]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"law": str(args.law), "rows": results, "commit": _commit(),
                                    "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")},
                                   indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
