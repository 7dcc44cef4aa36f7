"""bitcliff: low-bit LLM weight quantization, kernels, diagnosis and repair.

The entry points, each a plain function:

* :func:`quantize` (in place) and :class:`QuantConfig`; :class:`QuantLinear` is what linears become;
* :func:`save` and :func:`load`: GPTQ-format checkpoints;
* :func:`diagnose`: why a quantized model breaks (``bitcliff.diagnosis``);
* :func:`plan_repair` and :func:`repair`: training-free repairs chosen from a diagnosis
  (``bitcliff.repairs``), the bits split by what :func:`measure_repairs` finds each step buys;
* :class:`BitcliffConfig`: quantize on load with transformers' ``from_pretrained``.

Importing bitcliff leaves the process as it was (environment, threads, numerics); the commands
pin the CPU paths for their reproducible bytes, and :func:`bitcliff.numerics.pin` does it on request.
"""

from bitcliff import numerics  # noqa: F401  - bitcliff.numerics.pin(): the commands' bytes, on request
from bitcliff.diagnosis.run import diagnose
from bitcliff.hf_quantizer import BitcliffConfig
from bitcliff.quant.checkpoint import load, save
from bitcliff.quant.config import QuantConfig
from bitcliff.quant.convert import quantize
from bitcliff.quant.qlinear import QuantLinear
from bitcliff.repairs.measure import measure_repairs
from bitcliff.repairs.plan import RepairPlan, plan_repair
from bitcliff.repairs.run import repair

__all__ = ["BitcliffConfig", "QuantConfig", "QuantLinear", "RepairPlan", "quantize", "save", "load", "diagnose", "measure_repairs",
           "plan_repair", "repair"]
__version__ = "0.1.0"
