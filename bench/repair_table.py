"""Repair table: each repair alone, the diagnosis's plan, and the baselines, at equal bits.

    python -m bench.repair_table --model default --methods gptq --bits 4 3 2 \\
        --budgets 0.125 0.25 0.5 --variants plan lowrank restore heuristic eora \\
        --out bench/results/repair-default.jsonl

For every (model, quantization method, bits) the quantized checkpoint (``--group-size``, 64 by
default; GPTQ at bitcliff's default settings) and its diagnosis are made once and kept under ``--work``; then, per budget and
variant, a copy of the quantized model is repaired on the first ``--calib`` calibration windows
of the Wikipedia text and evaluated on the protocol's 16 windows of two texts: the Wikipedia
sample (``wiki``) and the Canterbury books (``canterbury``, not seen in calibration): perplexity,
mean KL divergence from the fp model and same-top-token share, and the recovery of the quantized
model's gap in perplexity and in KL.  Every row
is appended to ``--out`` as it finishes (JSON lines); a row already there is not run again.

Variants:

* ``none``: the quantized model itself (budget 0): the uniform-bits curve's points.
* ``plan``: ``bitcliff.plan_repair(diagnosis, budget)``, the diagnosis-chosen repairs.
* ``bias``, ``norm``, ``lowrank``, ``restore``: that repair alone, at the budget; ``a+b``: those
  repairs together (forced, so the plan's shares for forced methods apply).  Suffixes set the plan's
  low rank: ``@qB`` stores its factors at B bits (``lowrank@q4``), ``@rR`` caps its rank at R,
  ``@fF`` re-quantizes around the factors F times, ``@measured`` / ``@diagnosis`` picks the
  allocator (:func:`plan_options`).
* ``heuristic``: precision restoration by llama.cpp's fixed tensor priority (ffn_down > attn_v >
  ffn_up > ffn_gate > attn_o > attn_q > attn_k; within a kind the layers llama.cpp's
  ``use_more_bits`` favours first: the first and last eighth and every third layer between,
  then the rest in order) to the same bits the plan would use, within the budget.
* ``mixed``: no repair: the full-precision model quantized again with mixed precision
  (``bitcliff quantize --avg-bits``, :mod:`bitcliff.quant.mixed`) at the quantized model's bits
  per weight plus the budget: every module's width and group size chosen by Fisher-weighted
  error, the strongest use of the same bits that is not a repair.
* ``mixed+plan``: mixed precision at the quantized model's own bits per weight, then the
  diagnosis's plan (diagnosed anew, on the same windows as the others) with the budget.
* ``eora``: EoRA's published closed form (Liu et al. 2024; the one GPTQModel implements): one
  rank for every module, the largest the budget pays for, the output-error-optimal factors of
  ``W - Ŵ`` (``repairs.lowrank.lowrank_solution``: the same minimiser EoRA's eigen-whitened SVD
  computes) under the input covariance of the *full-precision* model, every layer on its own.  (GPTQModel's own ``adapter.generate`` runs on this CPU only in fp16, at about
  5 minutes per decoder layer of this 135M model: it was not run for the table.)
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import re
import sys
import time
from pathlib import Path

import torch

from bench.provenance import commit, now
from bitcliff.rows import append_row, done_keys

TEXTS = ("wiki", "canterbury")
# llama.cpp's priority of tensor kinds for more bits, mapped to Llama/Gemma module names.
LLAMA_CPP_PRIORITY = ("mlp.down_proj", "self_attn.v_proj", "mlp.up_proj", "mlp.gate_proj",
                      "self_attn.o_proj", "self_attn.q_proj", "self_attn.k_proj")


def use_more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's rule for the layers a tensor kind gets more bits in first."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def heuristic_plan(diagnosis: dict, budget: float):
    """A restoration plan by llama.cpp's fixed priority, at ``budget`` bits per weight."""
    from bitcliff.repairs.plan import RepairPlan
    from bitcliff.repairs.restore import restore_cost, restored_width

    modules = diagnosis["meta"]["modules"]
    n_layers = diagnosis["meta"]["n_layers"]
    weights = sum(m["in"] * m["out"] for m in modules.values())
    order = []
    for kind in LLAMA_CPP_PRIORITY:
        named = [(int(re.search(r"\.(\d+)\.", n).group(1)), n) for n in modules if n.endswith(kind)]
        order += [n for layer, n in sorted(named, key=lambda t: (not use_more_bits(t[0], n_layers), t[0]))]
    restore, spent = {}, 0.0
    for name in order:
        cost = restore_cost(modules[name])
        if spent + cost <= budget * weights:
            restore[name] = restored_width(modules[name]["bits"])
            spent += cost
    return RepairPlan(budget=budget, verdict=diagnosis["verdict"]["label"], methods=("restore",),
                      steps={"restore": {"modules": restore}}, reasons=["llama.cpp's fixed tensor priority"],
                      planned_bits=spent, weights=weights)


@torch.no_grad()
def apply_eora(fp_model, q_model, calib: torch.Tensor, budget: float) -> tuple[int, float]:
    """EoRA's closed form at one rank for every module (see the module docstring); returns
    ``(rank, bits per weight)``."""
    from bitcliff.quant.qlinear import QuantLinear
    from bitcliff.repairs.lowrank import lowrank_bits, lowrank_solution
    from bitcliff.statistics import HessianAccumulator

    quantized = {n: m for n, m in q_model.named_modules() if isinstance(m, QuantLinear)}
    weights = sum(m.in_features * m.out_features for m in quantized.values())
    per_rank = sum(lowrank_bits(1, m.in_features, m.out_features) for m in quantized.values())
    rank = int(budget * weights // per_rank)
    if rank < 1:
        return 0, 0.0
    fp_modules = dict(fp_model.named_modules())
    accs = {n: HessianAccumulator(m.in_features) for n, m in quantized.items()}
    handles = [fp_modules[n].register_forward_pre_hook(lambda mod, args, n=n: accs[n].add(args[0]))
               for n in quantized]
    try:
        for batch in calib.split(8):
            fp_model(input_ids=batch, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    for name, module in quantized.items():
        error = fp_modules[name].weight.float() - module.dequantize()
        solution = lowrank_solution(error, accs[name].hessian() / 2.0, rank)
        module.set_lowrank(*solution.factors(rank))
    return rank, rank * per_rank / weights


def quantize_mixed(fp_model, config, average_bits: float, calib: torch.Tensor):
    """The full-precision model quantized by ``config``'s method with mixed precision
    (``bitcliff quantize --avg-bits``) at ``average_bits``; returns ``(model, MixedPrecision)``."""
    import bitcliff
    from bitcliff.quant.mixed import choose_widths

    mixed = choose_widths(fp_model, config, average_bits, calib)
    gptq_inputs = {"calib_ids": calib[:64]} if config.method == "gptq" else {}
    return bitcliff.quantize(copy.deepcopy(fp_model), mixed.config, progress=False, **gptq_inputs), mixed


def plan_options(variant: str) -> dict:
    """``plan_repair`` settings of a repair variant: ``plan`` or repairs joined by ``+``, then any of
    ``@qB`` (factor bits), ``@rR`` (the largest low-rank rank), ``@fF`` (refinement rounds) and
    ``@measured`` or ``@diagnosis`` (the allocator): ``norm+lowrank@q4@r128``."""
    chosen, *settings = variant.split("@")
    options = {} if chosen == "plan" else {"methods": chosen.split("+")}
    for setting in settings:
        if setting in ("measured", "diagnosis"):
            options["allocator"] = setting
            continue
        key = {"q": "factor_bits", "r": "max_rank", "f": "refine_rounds"}.get(setting[:1])
        if key is None or not setting[1:].isdigit():
            raise SystemExit(f"variant {variant!r}: settings are @qB (factor bits), @rR (largest rank) "
                             "@fF (refinement rounds), @measured and @diagnosis (the allocator)")
        options[key] = int(setting[1:])
    return options


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--methods", nargs="+", default=["gptq"])
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2])
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.125, 0.25, 0.5])
    parser.add_argument("--variants", nargs="*", default=["plan", "lowrank", "restore", "heuristic", "eora"],
                        help="none at all: only the quantized model's own row (a point of the uniform-bits curve)")
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--calib", type=int, default=32, help="calibration windows for the repairs")
    parser.add_argument("--calib-offset", type=int, default=0,
                        help="the repairs calibrate on windows [offset, offset + calib) of the 64 GPTQ saw: "
                             "another draw, for the spread of a row")
    parser.add_argument("--work", type=Path, default=Path("runs/bench-repair"))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    for variant in args.variants:  # a bad variant is refused before any model is loaded
        if variant not in ("mixed", "mixed+plan", "eora", "heuristic"):
            plan_options(variant)

    import bitcliff
    from bitcliff.assets import load_text
    from bitcliff.data import calibration_windows, evaluation_windows
    from bitcliff.divergence import evaluate_with_reference, kl_recovery, reference_perplexity, reference_predictions
    from bitcliff.models import load_fp_model
    from bitcliff.repairs.plan import PlanError
    from bitcliff.repairs.run import PLANNING_DIAGNOSIS, diagnose_and_repair, recovery

    done = {key[:-1] for key in done_keys(args.out, ("model", "method", "bits", "group_size", "budget", "variant",
                                                      "calib_offset"))
            if key[-1] in (None, args.calib_offset)}
    fp, tokenizer, path = load_fp_model(args.model)
    args.work.mkdir(parents=True, exist_ok=True)
    texts = {name: load_text(name) for name in TEXTS}
    evals = {name: evaluation_windows(tokenizer, text, 16, 512) for name, text in texts.items()}
    calib = calibration_windows(tokenizer, texts["wiki"], max(args.calib + args.calib_offset, 64), 512)
    repair_calib = calib[args.calib_offset: args.calib_offset + args.calib]
    references = {name: reference_predictions(fp, ids, progress=False) for name, ids in evals.items()}
    fp_ppl = {name: reference_perplexity(reference)["ppl"] for name, reference in references.items()}

    def measure(model) -> tuple[dict, dict, dict]:
        """Per text: perplexity, mean KL from the fp model (nats), same top token (%)."""
        reports = {name: evaluate_with_reference(model, references[name], progress=False) for name in evals}
        return ({name: r["ppl"] for name, r in reports.items()}, {name: r["kl_mean"] for name, r in reports.items()},
                {name: r["same_top_pct"] for name, r in reports.items()})
    k = fp.config.hidden_size
    for method in args.methods:
        for bits in args.bits:
            config = bitcliff.QuantConfig(bits=bits, group_size=args.group_size, method=method)
            folder = args.work / f"{Path(args.model).name}-{config.describe()}"  # a model path names by its folder
            if not (folder / "config.json").is_file():
                model = bitcliff.quantize(copy.deepcopy(fp), config, calib_ids=calib[:64]) if method == "gptq" \
                    else bitcliff.quantize(copy.deepcopy(fp), config)
                bitcliff.save(model, folder, tokenizer=tokenizer, overwrite=True)
            q = bitcliff.load(folder)
            diag_path = args.work / f"{folder.name}-diagnosis.json"
            if not args.variants:
                diagnosis = {"verdict": {"label": None}}
            elif diag_path.is_file():
                diagnosis = json.loads(diag_path.read_text())
            else:
                diagnosis = bitcliff.diagnose(fp, q, evaluation_windows(tokenizer, texts["wiki"], 16, 256),
                                              options=PLANNING_DIAGNOSIS, name=folder.name, progress=False).to_dict()
                diag_path.write_text(json.dumps(diagnosis))
            q_ppl, q_kl, q_top = measure(q)
            base = {"model": args.model, "method": method, "bits": bits, "group_size": args.group_size,
                    "effective_bits": config.effective_bits(k), "verdict": diagnosis["verdict"]["label"],
                    "ppl_fp": fp_ppl, "ppl_quantized": q_ppl, "kl_quantized": q_kl}
            if (args.model, method, bits, args.group_size, 0.0, "none") not in done:
                append_row(args.out, {**base, "budget": 0.0, "variant": "none", "bits_spent": 0.0,
                                      "ppl": q_ppl, "kl": q_kl, "same_top_pct": q_top,
                                      "recovery": {t: 0.0 for t in TEXTS}, "kl_recovery": {t: 0.0 for t in TEXTS},
                                      "commit": commit(short=True)})
            for budget in args.budgets:
                for variant in args.variants:
                    key = (args.model, method, bits, args.group_size, budget, variant)
                    if key in done:
                        continue
                    repaired = copy.deepcopy(q)
                    start = time.perf_counter()
                    extra = {}
                    try:
                        if variant == "mixed":
                            repaired, mixed = quantize_mixed(fp, config, config.effective_bits(k) + budget, calib)
                            spent = mixed.average_bits - config.effective_bits(k)
                            extra["settings"] = mixed.summary()
                        elif variant == "mixed+plan":
                            repaired, mixed = quantize_mixed(fp, config, config.effective_bits(k), calib)
                            outcome = diagnose_and_repair(fp, repaired, repair_calib, budget,
                                                          examples=evaluation_windows(tokenizer, texts["wiki"], 16, 256))
                            spent = mixed.average_bits - config.effective_bits(k) + outcome.result.bits_per_weight
                            extra["settings"] = mixed.summary()
                            extra["methods"] = list(outcome.plan.methods)
                        elif variant == "eora":
                            rank, spent = apply_eora(fp, repaired, repair_calib, budget)
                            extra["rank"] = rank
                        else:
                            if variant == "heuristic":
                                plan = heuristic_plan(diagnosis, budget)
                                result = bitcliff.repair(fp, repaired, repair_calib, plan, progress=False)
                            else:
                                outcome = diagnose_and_repair(fp, repaired, repair_calib, budget,
                                                              diagnosis=diagnosis, plan_options=plan_options(variant))
                                plan, result = outcome.plan, outcome.result
                            modules = result.record.modules if result is not None else []  # None: nothing planned
                            spent = result.bits_per_weight if result is not None else 0.0
                            extra["methods"] = list(plan.methods)
                            extra["ranks"] = sorted({m.rank for m in modules if m.rank})
                            extra["restored"] = len([m for m in modules if m.restored_bits])
                    except PlanError as exc:
                        append_row(args.out, {**base, "budget": budget, "variant": variant, "skipped": str(exc)})
                        continue
                    seconds = time.perf_counter() - start
                    ppl, kl, top = measure(repaired)
                    row = {**base, "budget": budget, "variant": variant, "bits_spent": spent, "ppl": ppl,
                           "kl": kl, "same_top_pct": top,
                           "recovery": {t: recovery(fp_ppl[t], q_ppl[t], ppl[t]) for t in TEXTS},
                           "kl_recovery": {t: kl_recovery(q_kl[t], kl[t]) for t in TEXTS},
                           "seconds": round(seconds, 1), "calib_windows": args.calib,
                           "calib_offset": args.calib_offset, **extra,
                           "commit": commit(short=True), "date": now()}
                    append_row(args.out, row)
                    print(f"{args.model} {method} w{bits} +{budget:g} {variant:>9}: bits {spent:.4f} "
                          f"ppl {ppl['wiki']:.2f} / {ppl['canterbury']:.2f} (q {q_ppl['wiki']:.2f} / "
                          f"{q_ppl['canterbury']:.2f}; recovery {row['recovery']['wiki']:.0%} / "
                          f"{row['recovery']['canterbury']:.0%}, in KL {row['kl_recovery']['wiki']:.0%} / "
                          f"{row['kl_recovery']['canterbury']:.0%}) {seconds:.0f} s", flush=True)
                    if math.isnan(ppl["wiki"]):
                        print("  (nan perplexity)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
