"""Precision restoration: a module re-quantized from its full-precision weight at more bits (GPTQ
on the repaired model's inputs), or kept in full precision.

The checkpoint records such per-module overrides in ``quantization_config["dynamic"]``
(:mod:`bitcliff.quant.dynamic`), the convention GPTQModel writes and vLLM and SGLang read.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from bitcliff.quant.config import QuantConfig
from bitcliff.quant.dynamic import FULL_PRECISION
from bitcliff.quant.gptq import gptq_quantize
from bitcliff.quant.qlinear import QuantLinear


def restore_module(name: str, weight: torch.Tensor, bias: torch.Tensor | None, hessian: torch.Tensor,
                   config: QuantConfig, bits: int) -> nn.Module:
    """``weight`` (fp ``[N, K]``) as a ``QuantLinear`` of ``bits`` bits quantized by GPTQ with
    ``hessian`` (the layer's ``2 X Xᵀ / n`` on the repaired model's inputs) and ``config``'s other
    settings, or an ``nn.Linear`` for ``bits = 16``."""
    n, k = weight.shape
    if bits >= FULL_PRECISION:
        linear = nn.Linear(k, n, bias=bias is not None, dtype=torch.float32)
        with torch.no_grad():
            linear.weight.copy_(weight)
            if bias is not None:
                linear.bias.copy_(bias)
        return linear.to(weight.device)
    restored = dataclasses.replace(config, bits=bits, method="gptq")
    result = gptq_quantize(weight.detach().float(), hessian, restored, name=name)
    return QuantLinear.from_quantized(result.qweight, restored.group_size, bias, name).to(weight.device)
