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

The names above are imported when first used (PEP 562), so ``import bitcliff`` and
``import bitcliff.cli`` import neither torch nor transformers: the command line answers Ctrl-C
and ``--help`` at once.  ``quant_method="bitcliff"`` is registered with transformers when
``bitcliff.BitcliffConfig`` or ``bitcliff.hf_quantizer`` is first used, and by every bitcliff
function that loads a model through transformers (:func:`load`, the commands).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Public name -> the module that defines it.
_LAZY = {
    "BitcliffConfig": "bitcliff.hf_quantizer",
    "QuantConfig": "bitcliff.quant.config",
    "QuantLinear": "bitcliff.quant.qlinear",
    "RepairPlan": "bitcliff.repairs.plan",
    "quantize": "bitcliff.quant.convert",
    "save": "bitcliff.quant.checkpoint.save",
    "load": "bitcliff.quant.checkpoint.load",
    "diagnose": "bitcliff.diagnosis.run",
    "measure_repairs": "bitcliff.repairs.measure",
    "plan_repair": "bitcliff.repairs.plan",
    "repair": "bitcliff.repairs.run",
}

__all__ = ["BitcliffConfig", "QuantConfig", "QuantLinear", "RepairPlan", "quantize", "save", "load", "diagnose", "measure_repairs",
           "plan_repair", "repair"]


def __getattr__(name: str):
    """A public name, imported on first use and kept; or a subpackage (``bitcliff.quant``), as an
    eager ``import bitcliff`` used to make them available."""
    if name in _LAZY:
        if name == "load":  # a checkpoint may declare quant_method "bitcliff": transformers must know it
            importlib.import_module("bitcliff.hf_quantizer")
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    if not name.startswith("_"):
        try:
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as error:
            if error.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
