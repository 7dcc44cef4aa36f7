"""bitcliff: low-bit LLM weight quantization, kernels, diagnosis and repair."""

from bitcliff import diagnose  # noqa: E402  (a callable package: bitcliff.diagnose(fp, q, texts))
from bitcliff.quant.config import QuantConfig
from bitcliff.quant.convert import quantize
from bitcliff.quant.qlinear import QuantLinear

__all__ = ["QuantConfig", "QuantLinear", "quantize", "save", "load", "diagnose"]
__version__ = "0.1.0"


def save(model, directory, **kwargs):
    """Save a quantized model as a GPTQ-format checkpoint (see :func:`bitcliff.quant.checkpoint.save`)."""
    from bitcliff.quant.checkpoint import save as _save

    return _save(model, directory, **kwargs)


def load(directory, **kwargs):
    """Load a GPTQ-format checkpoint (see :func:`bitcliff.quant.checkpoint.load`)."""
    from bitcliff.quant.checkpoint import load as _load

    return _load(directory, **kwargs)

