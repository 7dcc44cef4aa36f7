"""The measuring pass of the repair allocator: what each repair step would buy, module by module,
before any module is repaired.

The plan from a diagnosis alone shares the budget among layers by the error each adds; the global
allocator (:mod:`bitcliff.repairs.allocate`) instead compares every candidate step of every
module in one unit and takes the best per bit.  It needs, per quantized module:

* its output error now, ``tr(E C Eᵀ)`` with ``E = W − Ŵ`` and ``C = E[x xᵀ]`` on the quantized
  model's own inputs (one walk over a few calibration windows, layer by layer, nothing changed);
* the spectrum of its output-error-optimal low-rank correction (``lowrank_solution``): the error
  rank ``r`` removes is the sum of the first ``r`` squared singular values;
* the error it would have at each wider width, estimated as its error now times the ratio of the
  round-to-nearest errors at the two widths on the same inputs.  Solving GPTQ at each width
  instead (exact on these inputs, a GPTQ run's solves more) chose restoration more often and
  repaired worse (SmolLM2 GPTQ W3 +0.25, restoration and low rank weighed together: 34.49 /
  155.77 wiki / Canterbury ppl against 32.49 / 153.63; Gemma-3: 29.07 / 161.61 against 29.24 /
  158.57): the loss a module's output error costs is an estimate, and restoration's more so;
* how much the loss cares about an error at its output, ``g``
  (:func:`bitcliff.quant.sensitivity.output_sensitivity`, on the full-precision model): the loss
  added is proportional to ``g · tr(E C Eᵀ)``, with one factor for all modules, which is what
  makes modules comparable.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from bitcliff.models import fingerprints
from bitcliff.group_walk import GroupWalk, capture_calibration_inputs
from bitcliff.kernels.cpu import exact_activations
from bitcliff.kernels.pack import SUPPORTED_BITS
from bitcliff.layers import find_decoder_layers
from bitcliff.quant.qlinear import QuantLinear
from bitcliff.quant.rtn import quantize_rtn
from bitcliff.quant.sensitivity import output_sensitivity
from bitcliff.quant.surgery import quant_config
from bitcliff.repairs.lowrank import MAX_RANK, lowrank_solution, output_error, whitening

#: Calibration windows of the measuring walk, and of the output-sensitivity estimate (a forward and
#: a backward pass each): enough for a ranking, a fraction of the repair walk's cost.
MEASURE_WINDOWS, SENSITIVITY_WINDOWS = 8, 4


@dataclass
class ModuleCurve:
    """What repairing one module can buy.

    Attributes:
        name: full name; layer: decoder layer index; in_features, out_features; bits, group_size:
            its quantization.
        error: output error now, ``tr(E C Eᵀ)`` (summed over outputs, mean over tokens).
        energy: the error removed by each low-rank direction, in order (``σ_i²``).
        widths: wider width -> estimated output error re-quantized at it (16: none left).
        sensitivity: ``g``, proportional to the loss per unit of output error (one factor for every
            module).
    """

    name: str
    layer: int
    in_features: int
    out_features: int
    bits: int
    group_size: int
    error: float
    energy: list[float]
    widths: dict[int, float]
    sensitivity: float

    def lowrank_error(self, rank: int) -> float:
        """Output error left by the rank-``rank`` correction (its fp32 factors)."""
        return max(self.error - sum(self.energy[:rank]), 0.0)


@dataclass
class Measurements:
    """Every quantized module's :class:`ModuleCurve`, how they were measured, and the
    fingerprints of the models measured (``models.fingerprints``: a plan refuses
    measurements of other models than its diagnosis's)."""

    modules: dict[str, ModuleCurve] = field(default_factory=dict)
    windows: int = 0
    sensitivity_windows: int = 0
    seconds: float = 0.0
    fingerprints: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Measurements":
        modules = {name: ModuleCurve(**{**m, "widths": {int(k): v for k, v in m["widths"].items()}})
                   for name, m in data["modules"].items()}
        return cls(modules, data["windows"], data["sensitivity_windows"], data["seconds"],
                   data.get("fingerprints") or {})


# Its forwards feed the repairs' measurements, defined on exact products: with the kernel's
# integer activations (AVX-512 builds only) the plan would depend on the machine's build.
@exact_activations()
@torch.no_grad()
def measure_repairs(fp_model: nn.Module, q_model: nn.Module, calib_ids: torch.Tensor, *, max_rank: int = MAX_RANK,
                    windows: int = MEASURE_WINDOWS, sensitivity_windows: int = SENSITIVITY_WINDOWS,
                    batch_size: int = 8, progress: bool = False) -> Measurements:
    """Measure every quantized module of ``q_model`` (module docstring); nothing is changed.

    Args:
        fp_model: the full-precision model ``q_model`` was quantized from.
        q_model: its quantization (``QuantLinear`` layers).
        calib_ids: int64 ``[n, T]`` calibration windows; the first ``windows`` are walked, the
            first ``sensitivity_windows`` give the output sensitivities.
        max_rank: the longest low-rank spectrum measured (cut below each module's smaller side).
    """
    if calib_ids.dim() != 2 or calib_ids.shape[0] == 0:
        raise ValueError(f"calib_ids must be int64 [n_windows, seq_len] with n_windows > 0, got {tuple(calib_ids.shape)}")
    start = time.perf_counter()
    config = quant_config(q_model)
    if config is None:
        raise ValueError("the quantized model carries no QuantConfig: load it with bitcliff.load or quantize it first")
    prefix, q_layers = find_decoder_layers(q_model)
    _, fp_layers = find_decoder_layers(fp_model)
    names = [f"{prefix}.{i}.{rel}" for i, layer in enumerate(q_layers)
             for rel, m in layer.named_modules() if isinstance(m, QuantLinear)]
    modes = (fp_model.training, q_model.training)
    fp_model.eval()  # no dropout in what is measured
    q_model.eval()
    try:
        with torch.enable_grad():
            sensitivity = output_sensitivity(fp_model, names, calib_ids[:sensitivity_windows].long(), progress=progress)
        walked = calib_ids[:windows].long()
        calls = capture_calibration_inputs(q_model, q_layers, walked, batch_size)
        hidden = calls.inputs[0]
        measured = Measurements(windows=int(walked.shape[0]), sensitivity_windows=min(sensitivity_windows, len(calib_ids)),
                                fingerprints=fingerprints(fp_model, q_model))
        for index in tqdm(range(len(q_layers)), desc="measure", unit="layer", disable=not progress):
            layer, name = q_layers[index], f"{prefix}.{index}"
            linears = {rel: m for rel, m in layer.named_modules() if isinstance(m, (QuantLinear, nn.Linear))}
            walk = GroupWalk(layer, linears, hidden, calls.calls[index], name=name)
            for group in walk:
                covariance = group.statistics.hessian() / 2.0  # E[x xᵀ]
                root = whitening(covariance)
                for rel in group.members:
                    module = linears[rel]
                    if not isinstance(module, QuantLinear):
                        continue
                    full = f"{name}.{rel}"
                    target = fp_layers[index].get_submodule(rel).weight.detach().float()
                    measured.modules[full] = _curve(full, index, module, target, covariance, root, config.for_module(full),
                                                    max_rank=max_rank, sensitivity=sensitivity[full])
            hidden = walk.outputs
        measured.seconds = time.perf_counter() - start
        return measured
    finally:
        fp_model.train(modes[0])
        q_model.train(modes[1])


def _curve(name: str, layer: int, module: QuantLinear, target: torch.Tensor, covariance: torch.Tensor,
           root: torch.Tensor, own, *, max_rank: int, sensitivity: float) -> ModuleCurve:
    error = target - module.effective_weight()
    now = output_error(error, covariance)
    limit = min(max_rank, min(module.in_features, module.out_features) - 1)
    energy = lowrank_solution(error, covariance, limit, root=root).energy.tolist() if limit >= 1 else []
    rtn_now = output_error(target - quantize_rtn(target, own, name).dequantize(), covariance)
    widths = {}
    for bits in (b for b in (*SUPPORTED_BITS, 16) if b > module.bits):
        if bits == 16:
            widths[16] = 0.0
            continue
        wider = dataclasses.replace(own, bits=bits)
        rtn_wider = output_error(target - quantize_rtn(target, wider, name).dequantize(), covariance)
        widths[bits] = now * rtn_wider / max(rtn_now, 1e-30)
    return ModuleCurve(name, layer, module.in_features, module.out_features, module.bits, module.group_size,
                       now, energy, widths, sensitivity)
