"""bitcliff: low-bit LLM weight quantization, kernels, diagnosis and repair.

The entry points, each a plain function:

* :func:`quantize` (in place) and :class:`QuantConfig`; :class:`QuantLinear` is what linears become;
* :func:`save` and :func:`load`: GPTQ-format checkpoints;
* :func:`diagnose`: why a quantized model breaks (``bitcliff.diagnosis``);
* :func:`plan_repair` and :func:`repair`: training-free repairs chosen from a diagnosis
  (``bitcliff.repairs``), the bits split by what :func:`measure_repairs` finds each step buys;
* :class:`BitcliffConfig`: quantize on load with transformers' ``from_pretrained``.
"""

from bitcliff import numerics

numerics.pin()  # before torch's first operation: the same bytes on every x86 machine and thread count

from bitcliff.diagnosis.run import diagnose  # noqa: E402
from bitcliff.hf_quantizer import BitcliffConfig  # noqa: E402
from bitcliff.quant.checkpoint import load, save  # noqa: E402
from bitcliff.quant.config import QuantConfig  # noqa: E402
from bitcliff.quant.convert import quantize  # noqa: E402
from bitcliff.quant.qlinear import QuantLinear  # noqa: E402
from bitcliff.repairs.measure import measure_repairs  # noqa: E402
from bitcliff.repairs.plan import RepairPlan, plan_repair  # noqa: E402
from bitcliff.repairs.run import repair  # noqa: E402

__all__ = ["BitcliffConfig", "QuantConfig", "QuantLinear", "RepairPlan", "quantize", "save", "load", "diagnose", "measure_repairs",
           "plan_repair", "repair"]
__version__ = "0.1.0"
