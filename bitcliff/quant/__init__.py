"""Quantization: QuantConfig, RTN, GPTQ, QuantLinear, model conversion, checkpoints."""
