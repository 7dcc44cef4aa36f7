"""``repair()``: apply a repair plan to a quantized model, on calibration data; and
``diagnose_and_repair()``, the whole sequence every caller runs.

    plan = bitcliff.plan_repair(report, budget=0.25)          # from a diagnosis
    result = bitcliff.repair(fp_model, q_model, calib_ids, plan)
    bitcliff.save(q_model, "runs/w3g64-r", extra_files=result.files())   # checkpoint + adapter + repair.json

    outcome = diagnose_and_repair(fp_model, q_model, calib_ids, 0.25, examples=windows,
                                  eval_ids=eval_windows, out="runs/w3g64-r", tokenizer=tokenizer)

The sequence (diagnose, or take a diagnosis; plan; repair; evaluate; write) is the one the command
line (``bitcliff repair``), the main job (``bitcliff cliff``) and the benchmarks run.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from bitcliff.device import model_device
from bitcliff.diagnosis.run import DiagnoseOptions, diagnose
from bitcliff.divergence import (
    ReferencePredictions,
    evaluate_with_reference,
    headline,
    reference_perplexity,
    reference_predictions,
)
from bitcliff.models import fingerprints, quantized_modules
from bitcliff.repairs.budget import quantized_weights
from bitcliff.repairs.lowrank import MAX_RANK
from bitcliff.repairs.measure import measure_repairs
from bitcliff.repairs.plan import (
    ALLOCATOR,
    ALLOCATORS,
    BudgetTooSmallError,
    PlanError,
    RepairPlan,
    plan_repair,
)
from bitcliff.repairs.registry import repairs
from bitcliff.repairs.walk import DEFAULT_BATCH_SIZE, WalkRecord, repair_walk
from bitcliff.storage import write_json

RECORD_FILE = "repair.json"
#: The diagnosis a repair plan is made from: its examples traced and one captured, no activation
#: patching (it does not vote on the verdict, and it is the slowest analysis).
PLANNING_DIAGNOSIS = DiagnoseOptions(trace_examples=8, patch_examples=0, capture_examples=1)


def recovery(ppl_fp: float, ppl_q: float, ppl_r: float) -> float:
    """Share of the quantization gap a repair closes, in log perplexity (NaN without a gap)."""
    gap = math.log(ppl_q) - math.log(ppl_fp)
    return (math.log(ppl_q) - math.log(ppl_r)) / gap if gap > 0 else float("nan")


@dataclass
class RepairResult:
    """The plan, what the walk did, and the bits it spent (extra bits per quantized weight)."""

    plan: RepairPlan
    record: WalkRecord
    weights: int

    @property
    def bits_per_weight(self) -> float:
        return self.record.bits / self.weights if self.weights else 0.0

    def to_dict(self) -> dict:
        return {
            "plan": self.plan.to_dict(),
            "bits_per_weight": self.bits_per_weight,
            "weights": self.weights,
            "walk": {**asdict(self.record), "modules": [asdict(m) for m in self.record.modules]},
        }

    def files(self) -> dict:
        """``{"repair.json": writer}`` for :func:`bitcliff.save`'s ``extra_files``."""
        text = json.dumps(self.to_dict(), indent=1)
        return {RECORD_FILE: lambda path: Path(path).write_text(text)}


def check_made_on(expected: dict | None, fp_model: nn.Module, q_model: nn.Module) -> None:
    """Raise ``ValueError`` when the fingerprints a diagnosis recorded (``meta.fingerprints``,
    which its plan carries) are not those of these models: whatever it says, healthy included,
    would be about other weights."""
    expected = expected or {}
    actual = fingerprints(fp_model, q_model)
    for key, what in (("fp", "full-precision model"), ("quantized", "quantized model")):
        if expected.get(key) is not None and expected[key] != actual[key]:
            raise ValueError(f"the diagnosis (and plan) was made on another {what}: its weights' fingerprint "
                             "differs; diagnose these models first")


def check_plan_fits(plan: RepairPlan, fp_model: nn.Module, q_model: nn.Module) -> None:
    """Raise ``ValueError`` when ``plan`` was made for another model or quantization."""
    target = plan.target or {}
    modules = quantized_modules(q_model)
    check_made_on(target.get("fingerprints"), fp_model, q_model)
    missing = [name for name in plan.restore if name not in modules]
    if missing:
        raise ValueError(f"the plan restores {missing[0]}, which is not a quantized module of this model")
    ranked = [name for name in (plan.steps.get("lowrank") or {}).get("module_ranks", {}) if name not in modules]
    if ranked:
        raise ValueError(f"the plan gives low-rank factors to {ranked[0]}, which is not a quantized module of this model")
    if plan.weights and plan.weights != quantized_weights(q_model):
        raise ValueError(f"the plan was made for {plan.weights} quantized weights, this model has "
                         f"{quantized_weights(q_model)}")


def repair(fp_model: nn.Module, q_model: nn.Module, calib_ids: torch.Tensor, plan: RepairPlan,
           batch_size: int = DEFAULT_BATCH_SIZE, progress: bool = True, ranks=None) -> RepairResult:
    """Repair ``q_model`` in place by ``plan`` and return what was done.

    Args:
        fp_model: the full-precision model ``q_model`` was quantized from.
        q_model: the quantized model (``bitcliff.quantize`` or ``bitcliff.load``).
        calib_ids: int64 ``[n, T]`` calibration windows (``bitcliff.data.calibration_windows``).
        plan: from :func:`bitcliff.repairs.plan.plan_repair`.
        batch_size: windows per forward.
        progress: tqdm bars.
        ranks: a :class:`bitcliff.distributed.Ranks` sharing the calibration walk; None for one
            process.
    Raises:
        ValueError: a plan made for another model, or calibration data of the wrong form.
    """
    if not isinstance(calib_ids, torch.Tensor) or calib_ids.dim() != 2 or calib_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError("calib_ids must be an integer [n_windows, seq_len] tensor of token ids")
    check_plan_fits(plan, fp_model, q_model)
    weights = quantized_weights(q_model)
    fp_model.eval()
    q_model.eval()
    record = repair_walk(fp_model, q_model, calib_ids.long(), plan, batch_size=batch_size, progress=progress,
                         ranks=ranks)
    allowed = plan.budget * weights
    if record.bits > allowed * (1 + 1e-9) + 1e-6:
        raise RuntimeError(f"the repair stored {record.bits:.0f} bits where the budget allows {allowed:.0f}")
    return RepairResult(plan, record, weights)


@dataclass
class RepairOutcome:
    """What :func:`diagnose_and_repair` did.

    Attributes:
        diagnosis: the diagnosis the plan follows (``DiagnosisReport.to_dict()``).
        plan: the plan.
        result: the repair, or None when the plan had nothing to do (a healthy verdict).
        ppl: perplexities evaluated (``fp``, ``quantized``, ``repaired``) on ``eval_ids``.
        seconds: ``diagnosis`` and ``repair`` times.
        divergence: KL divergence and same-top agreement against the full-precision model
            (``divergence.headline``) of the models evaluated (``quantized``, ``repaired``), where
            a reference was given.
    """

    diagnosis: dict
    plan: RepairPlan
    result: RepairResult | None
    ppl: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)
    divergence: dict | None = None

    @property
    def recovery(self) -> float:
        if not {"fp", "quantized", "repaired"} <= set(self.ppl):
            return float("nan")
        return recovery(self.ppl["fp"], self.ppl["quantized"], self.ppl["repaired"])

    def record(self, **extra) -> dict:
        """``repair.json``: the plan, what the walk did, the bits, and the evaluation."""
        base = self.result.to_dict() if self.result is not None else {"plan": self.plan.to_dict(), "bits_per_weight": 0.0}
        divergence = {} if self.divergence is None else {"divergence": self.divergence}
        return {**base, "ppl": self.ppl, "recovery": self.recovery, **divergence,
                "seconds": {k: round(v, 1) for k, v in self.seconds.items()}, **extra}


def diagnose_and_repair(
    fp_model: nn.Module,
    q_model: nn.Module,
    calib_ids: torch.Tensor,
    budget: float,
    *,
    diagnosis: dict | None = None,
    examples: torch.Tensor | None = None,
    plan_options: dict | None = None,
    eval_ids: torch.Tensor | None = None,
    known_ppl: dict | None = None,
    reference: ReferencePredictions | None = None,
    divergence: bool = False,
    out: str | Path | None = None,
    tokenizer=None,
    overwrite: bool = False,
    record_extra: dict | None = None,
    on_plan: Callable[[dict, RepairPlan], None] | None = None,
    progress: bool = False,
    name: str = "quantized",
) -> RepairOutcome:
    """Diagnose (or take ``diagnosis``), plan, repair ``q_model`` in place, evaluate, and write.

    Args:
        fp_model, q_model: the full-precision model and its quantization (repaired in place).
        calib_ids: int64 ``[n, T]`` calibration windows for the repair.
        budget: extra bits per quantized weight.
        diagnosis: a diagnosis of these models to plan from; else one is made on ``examples``
            with :data:`PLANNING_DIAGNOSIS`.
        plan_options: settings of :func:`~bitcliff.repairs.plan.plan_repair` (``methods``,
            ``rank``, ``max_rank``, ``outlier_share``, ``refine_rounds``, ``factor_bits``), and
            ``allocator``: ``"measured"`` (a measuring pass on ``calib_ids``, then the global
            allocator) or ``"diagnosis"`` (the diagnosis's layer shares); default
            :data:`~bitcliff.repairs.plan.ALLOCATOR`.
        eval_ids: windows to evaluate the perplexity on (none: no evaluation).
        known_ppl: perplexities already measured on ``eval_ids`` (``fp``, ``quantized``), not run again.
        reference: the full-precision model's predictions on ``eval_ids``
            (``divergence.reference_predictions``): its perplexity stands for ``fp``'s, and each
            evaluation also measures KL divergence and same-top agreement, in the same forward
            passes.
        divergence: measure them without a reference at hand: ``fp_model``'s predictions on
            ``eval_ids`` are made once the plan stands (so that a plan refused costs no forward).
        out: a folder to save the repaired checkpoint to (with ``repair.json``), ``tokenizer`` beside it.
        record_extra: more fields for ``repair.json``.
        on_plan: called with the diagnosis and the plan before the repair runs (to show it).
    Raises:
        PlanError: the budget buys nothing, or bad methods or rank.
        ValueError: a diagnosis of other models, or bad calibration data.
    """
    import bitcliff  # noqa: PLC0415 - the package's save
    from bitcliff.eval import evaluate_ppl  # noqa: PLC0415

    if reference is not None and eval_ids is not None and not torch.equal(eval_ids, reference.eval_ids):
        raise ValueError("reference: its predictions were made on other windows than eval_ids")
    if reference is not None:
        eval_ids = reference.eval_ids

    measured: dict = {}

    def evaluate(model: nn.Module, key: str) -> float:
        """``model``'s perplexity (and, with a reference, its divergence, kept under ``key``)."""
        if reference is None:
            return evaluate_ppl(model, eval_ids, progress=False)["ppl"]
        report = evaluate_with_reference(model, reference, progress=False)
        measured[key] = headline(report)
        return report["ppl"]

    seconds = {}
    start = time.perf_counter()
    if diagnosis is None:
        if examples is None:
            raise ValueError("diagnose_and_repair needs a diagnosis or examples to diagnose on")
        diagnosis = diagnose(fp_model, q_model, examples, options=PLANNING_DIAGNOSIS, name=name,
                             progress=progress).to_dict()
        seconds["diagnosis"] = time.perf_counter() - start
    if not isinstance(diagnosis, dict):
        diagnosis = diagnosis.to_dict()
    # before anything is measured, and also when the verdict plans nothing (healthy)
    check_made_on((diagnosis.get("meta") or {}).get("fingerprints"), fp_model, q_model)
    options = dict(plan_options or {})
    allocator = options.pop("allocator", ALLOCATOR)
    if allocator not in ALLOCATORS:
        raise PlanError(f"allocator must be one of {ALLOCATORS}, got {allocator!r}")
    try:  # checks every option before the measuring pass
        plan = plan_repair(diagnosis, budget, **options)
    except BudgetTooSmallError:
        if allocator != "measured":
            raise
        plan = None  # single measured steps may cost less than the diagnosis's plan's smallest
    methods = options.get("methods") or [name for name, r in repairs().items() if r.auto]
    wanted = plan is None or bool(plan.methods)  # nothing to measure for a healthy verdict
    if allocator == "measured" and wanted and any(repairs()[m].weighable for m in methods):
        start = time.perf_counter()
        longest = max(options.get("rank") or 0, options.get("max_rank") or MAX_RANK)
        options["measured"] = measure_repairs(fp_model, q_model, calib_ids, max_rank=longest, progress=progress)
        seconds["measure"] = time.perf_counter() - start
        plan = plan_repair(diagnosis, budget, **options)
    if on_plan is not None:
        on_plan(diagnosis, plan)
    if divergence and reference is None and eval_ids is not None:
        reference = reference_predictions(fp_model, eval_ids, progress=False)
    ppl = dict(known_ppl or {})
    if reference is not None and "fp" not in ppl:
        ppl["fp"] = reference_perplexity(reference)["ppl"]
    if eval_ids is not None:
        for key, model in (("fp", fp_model), ("quantized", q_model)):
            if key not in ppl:
                ppl[key] = evaluate(model, key)
    if not plan.methods:
        if "quantized" in ppl:
            ppl["repaired"] = ppl["quantized"]
        return RepairOutcome(diagnosis, plan, None, ppl, seconds, measured or None)
    start = time.perf_counter()
    result = repair(fp_model, q_model, calib_ids, plan, progress=progress)
    seconds["repair"] = time.perf_counter() - start
    outcome = RepairOutcome(diagnosis, plan, result, ppl, seconds, measured or None)
    if out is None:
        if eval_ids is not None:
            ppl["repaired"] = evaluate(q_model, "repaired")
            outcome.divergence = measured or None
        return outcome
    text = json.dumps(outcome.record(**(record_extra or {})), indent=1)
    bitcliff.save(q_model, out, tokenizer=tokenizer, overwrite=overwrite,
                  extra_files={RECORD_FILE: lambda path: Path(path).write_text(text)})
    if eval_ids is not None:  # the checkpoint as written is what is measured
        ppl["repaired"] = evaluate(bitcliff.load(out, device=model_device(q_model)), "repaired")
        outcome.divergence = measured or None
        write_json(Path(out) / RECORD_FILE, outcome.record(**(record_extra or {})), indent=1)
    return outcome
