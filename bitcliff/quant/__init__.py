"""Quantization: QuantConfig, the integer grid, RTN, GPTQ (one weight, one layer, the in-memory and
the streaming walk over layers), QuantLinear, model conversion, and GPTQ-format checkpoints.

May import: :mod:`bitcliff.kernels` and the shared modules beside the packages (``layers``,
``statistics``, ``group_walk``, ``distributed``, ``device``, ``storage``); never diagnosis, repairs or above.
"""
