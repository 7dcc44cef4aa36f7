"""bitcliff: low-bit LLM weight quantization, kernels, diagnosis and repair.

The entry points, each a plain function:

* :func:`quantize` (in place) and :class:`QuantConfig`; :class:`QuantLinear` is what linears become;
* :func:`save` and :func:`load`: GPTQ-format checkpoints;
* :func:`diagnose`: why a quantized model breaks (``bitcliff.diagnosis``).
"""

from bitcliff.diagnosis.run import diagnose
from bitcliff.quant.checkpoint import load, save
from bitcliff.quant.config import QuantConfig
from bitcliff.quant.convert import quantize
from bitcliff.quant.qlinear import QuantLinear

__all__ = ["QuantConfig", "QuantLinear", "quantize", "save", "load", "diagnose"]
__version__ = "0.1.0"
