"""What repairs cost, in common terms: every bit stored, counted as extra bits per quantized weight.

The budget of a repair is spent over the quantized weights of the model it repairs
(``quantized_weights``: the sum of K x N over its ``QuantLinear`` layers).  A stored fp16 value
costs 16 bits; a module at another width costs the difference between its new and its old bits
per weight, each counting one fp16 scale and one zero point per group
(``quant.config.bits_per_weight``).  Each repair counts its own storage with these (``bias.bias_bits``,
``lowrank.lowrank_bits``, ``restore.restore_cost``).
"""

from __future__ import annotations

from torch import nn

from bitcliff.quant.config import bits_per_weight
from bitcliff.quant.qlinear import QuantLinear

FP16_BITS = 16


def quantized_weights(model: nn.Module) -> int:
    """Number of weights held by the ``QuantLinear`` layers of ``model``."""
    return sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, QuantLinear))


def weight_bits(bits: int, group_size: int, in_features: int) -> float:
    """Stored bits per weight of a ``bits``-bit layer (16 for full precision): the code plus an fp16
    scale and a ``bits``-wide zero point per group."""
    if bits >= FP16_BITS:
        return float(FP16_BITS)
    return bits_per_weight(bits, group_size, in_features)


def width_change_bits(in_features: int, out_features: int, old: tuple[int, int], new: tuple[int, int]) -> float:
    """Re-quantizing a ``[N, K]`` layer from ``old = (bits, group_size)`` to ``new`` (bits 16: kept
    in full precision)."""
    per_weight = weight_bits(*new, in_features) - weight_bits(*old, in_features)
    return per_weight * in_features * out_features
