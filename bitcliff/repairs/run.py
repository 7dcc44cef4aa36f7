"""``repair()``: apply a repair plan to a quantized model, on calibration data.

    plan = bitcliff.plan_repair(report, budget=0.25)          # from a diagnosis
    result = bitcliff.repair(fp_model, q_model, calib_ids, plan)
    bitcliff.save(q_model, "runs/w3g64-r", extra_files=result.files())   # checkpoint + adapter + repair.json
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from bitcliff.diagnosis.run import fingerprints, quantized_modules
from bitcliff.repairs.budget import quantized_weights
from bitcliff.repairs.plan import RepairPlan
from bitcliff.repairs.walk import DEFAULT_BATCH_SIZE, WalkRecord, repair_walk

RECORD_FILE = "repair.json"


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


def check_plan_fits(plan: RepairPlan, fp_model: nn.Module, q_model: nn.Module) -> None:
    """Raise ``ValueError`` when ``plan`` was made for another model or quantization."""
    target = plan.target or {}
    modules = quantized_modules(q_model)
    expected = (target.get("fingerprints") or {})
    actual = fingerprints(fp_model, q_model)
    for key, what in (("fp", "full-precision model"), ("quantized", "quantized model")):
        if expected.get(key) is not None and expected[key] != actual[key]:
            raise ValueError(f"the diagnosis (and plan) was made on another {what}: its weights' fingerprint "
                             "differs; diagnose these models first")
    missing = [name for name in plan.restore if name not in modules]
    if missing:
        raise ValueError(f"the plan restores {missing[0]}, which is not a quantized module of this model")
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
