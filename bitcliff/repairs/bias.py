"""Bias correction: the per-output shift that makes a quantized layer's mean output what its
full-precision weight gives on the same inputs.

For a linear with full-precision weight ``W`` and effective quantized weight ``Ŵ`` (codes plus
any low-rank term), ``b += E[W x − Ŵ x] = (W − Ŵ) x̄``, with ``x̄`` the mean input of the layer
*in the repaired quantized model*: the layers before it are already repaired, so a correction
never counts an error twice.  (Matching instead the full-precision model's own mean output,
which also carries the drift accumulated upstream, over-corrects: on SmolLM2 at W3 it raised the
perplexity from 42 to 130, where this form lowers it; docs/repair.md.)  It removes the mean
component of the output error and costs one fp16 value per output (``budget.bias_bits``) where
the layer had no bias.
"""

from __future__ import annotations

import torch


def bias_shift(target: torch.Tensor, weight: torch.Tensor, mean_input: torch.Tensor) -> torch.Tensor:
    """fp32 ``[N]`` to add to the bias: ``(W − Ŵ) x̄``.

    Args:
        target: ``[N, K]`` the full-precision weight ``W``.
        weight: ``[N, K]`` the quantized layer's effective weight ``Ŵ``.
        mean_input: ``[K]`` the repaired quantized model's mean input to the layer.
    """
    return ((target.double() - weight.double()) @ mean_input.double()).float()
