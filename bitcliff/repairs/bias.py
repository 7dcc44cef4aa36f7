"""Bias correction: the per-output shift that makes the quantized layer's mean output the
full-precision model's, on calibration data.

For a linear at the same place in both models, ``b += E_fp[y] − E_q[y]``: the full-precision
model's mean output there (its own inputs) minus the repaired quantized model's mean output (its
inputs, which already carry the corrections of the layers before it, so nothing is counted
twice).  With the quantized layer's effective weight ``Ŵ`` and its mean input ``x̄``,
``E_q[y] = Ŵ x̄ + b``.  The correction removes the mean component of the output error and
costs one fp16 value per output (``budget.bias_bits``) where the layer had no bias.
"""

from __future__ import annotations

import torch


def bias_shift(fp_mean_output: torch.Tensor, weight: torch.Tensor, mean_input: torch.Tensor,
               bias: torch.Tensor | None) -> torch.Tensor:
    """fp32 ``[N]`` to add to the bias.

    Args:
        fp_mean_output: ``[N]`` the FP model's mean output of this linear.
        weight: ``[N, K]`` the quantized layer's effective weight.
        mean_input: ``[K]`` the repaired quantized model's mean input to it.
        bias: its current ``[N]`` bias, or None.
    """
    q_mean = weight.double() @ mean_input.double()
    if bias is not None:
        q_mean = q_mean + bias.double()
    return (fp_mean_output.double() - q_mean).float()
