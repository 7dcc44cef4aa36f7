"""Mixed precision: each module's width and group size, chosen by measured sensitivity under an
average budget of bits per weight.

For every module and every candidate setting (2, 3 or 4 bits; groups of 32, 64 or 128) the
loss the setting would add is estimated as ``Σ F ⊙ (W − Ŵ)²`` (:mod:`bitcliff.quant.sensitivity`;
``Ŵ`` the setting's RTN grid, the same for RTN and a good proxy for GPTQ's ranking), and its cost
is its stored bits (``QuantConfig.effective_bits``: codes, an fp16 scale and a zero point per group)
times the module's weights.  Choosing one setting per module under a total is a multiple-choice
knapsack; :func:`allocate` solves it greedily on each module's lower convex hull of (cost, loss):
every module starts at its cheapest setting, and the upgrade with the largest loss reduction per
bit is taken while the budget allows.  On convex hulls this greedy is optimal up to the last,
partial step.

The result is an ordinary :class:`QuantConfig`: its ``bits`` and ``group_size`` are the setting
that holds the most weights, and ``module_widths`` lists every module set otherwise, so that a
checkpoint's ``quantization_config["dynamic"]`` (GPTQModel's per-module override) has the fewest
entries.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from bitcliff.kernels.pack import SUPPORTED_BITS
from bitcliff.knapsack import allocate
from bitcliff.quant.config import QuantConfig
from bitcliff.quant.rtn import quantize_rtn
from bitcliff.quant.sensitivity import fisher_diagonal, weighted_error
from bitcliff.quant.surgery import quantizable_linears

GROUP_SIZES = (32, 64, 128)
# Windows for the Fisher estimate: each costs one forward and backward pass of the whole model.
SENSITIVITY_WINDOWS = 16


@dataclass(frozen=True)
class Option:
    """One setting of one module: ``bits``, ``group_size``, its stored ``cost`` in bits and the
    loss ``error`` it is estimated to add."""

    bits: int
    group_size: int
    cost: float
    error: float


@dataclass
class MixedPrecision:
    """What :func:`choose_widths` decided: the ``config`` to quantize with, every module's
    ``choice`` and the ``average_bits`` it stores per weight."""

    config: QuantConfig
    choice: dict[str, Option]
    weights: dict[str, int]

    @property
    def average_bits(self) -> float:
        return sum(o.cost for o in self.choice.values()) / sum(self.weights.values())

    def summary(self) -> str:
        """One line: the average and how many modules and weights each setting holds."""
        counts: dict[tuple[int, int], list[int]] = {}
        for name, option in self.choice.items():
            entry = counts.setdefault((option.bits, option.group_size), [0, 0])
            entry[0] += 1
            entry[1] += self.weights[name]
        total = sum(self.weights.values())
        parts = [f"W{b} g{g}: {n} modules ({w / total:.0%} of weights)"
                 for (b, g), (n, w) in sorted(counts.items(), key=lambda kv: -kv[1][1])]
        return f"{self.average_bits:.3f} bits per weight; " + ", ".join(parts)


def candidate_settings(bits: tuple[int, ...] = SUPPORTED_BITS,
                       group_sizes: tuple[int, ...] = GROUP_SIZES) -> list[tuple[int, int]]:
    """Every ``(bits, group_size)`` pair mixed precision chooses among."""
    return [(b, g) for b in bits for g in group_sizes]


@torch.no_grad()
def module_options(weight: torch.Tensor, fisher: torch.Tensor, base: QuantConfig, name: str,
                   settings: list[tuple[int, int]]) -> list[Option]:
    """Every candidate setting of one ``[N, K]`` weight with its cost and estimated loss."""
    out_features, in_features = weight.shape
    options = []
    for bits, group_size in settings:
        config = replace(base, bits=bits, group_size=group_size, module_widths=())
        dequantized = quantize_rtn(weight, config, name).dequantize()
        options.append(Option(bits, group_size, config.effective_bits(in_features) * in_features * out_features,
                              weighted_error(weight, dequantized, fisher)))
    return options


def choose_widths(model: nn.Module, base: QuantConfig, average_bits: float, calib_ids: torch.Tensor,
                  settings: list[tuple[int, int]] | None = None, progress: bool = False) -> MixedPrecision:
    """Each selected linear's bits and group size, at most ``average_bits`` stored bits per weight
    on average over them.

    Args:
        model: the full-precision causal LM (unchanged).
        base: every other setting (method, symmetry, GPTQ knobs, skipped modules).
        average_bits: the budget, in the unit of ``QuantConfig.effective_bits``.
        calib_ids: int64 ``[n_windows, seq_len]``; the first :data:`SENSITIVITY_WINDOWS` give
            the Fisher estimate.
        settings: the candidate ``(bits, group_size)`` pairs (:func:`candidate_settings` by default).
    Returns:
        A :class:`MixedPrecision` whose ``config`` quantizes the model as chosen.
    Raises:
        ValueError: a budget below the cheapest setting or above 16 bits, or no linear to quantize.
    """
    settings = settings or candidate_settings()
    if not 0 < average_bits <= 16:
        raise ValueError(f"average bits must lie in (0, 16], got {average_bits!r}")
    linears = quantizable_linears(model, base)
    if not linears:
        raise ValueError("the model has no nn.Linear layers left to quantize with this config")
    weights = {name: linear.weight.numel() for name, linear in linears}
    floor = sum(min(replace(base, bits=b, group_size=g, module_widths=()).effective_bits(linear.in_features)
                    for b, g in settings) * weights[name] for name, linear in linears) / sum(weights.values())
    if average_bits < floor * (1 - 1e-12):  # refused before the sensitivity pass, which is the long part
        raise ValueError(f"average bits {average_bits:g} is below the cheapest choice of every module, {floor:.3f} "
                         "bits per weight")
    fisher = fisher_diagonal(model, list(weights), calib_ids[:SENSITIVITY_WINDOWS], progress=progress)
    options = {name: module_options(linear.weight.detach(), fisher.pop(name), base, name, settings)
               for name, linear in linears}
    choice = allocate(options, average_bits * sum(weights.values()))
    held: dict[tuple[int, int], int] = {}
    for name, option in choice.items():
        held[(option.bits, option.group_size)] = held.get((option.bits, option.group_size), 0) + weights[name]
    main = max(held, key=held.get)
    widths = tuple((name, o.bits, o.group_size) for name, o in choice.items() if (o.bits, o.group_size) != main)
    config = replace(base, bits=main[0], group_size=main[1], module_widths=widths)
    return MixedPrecision(config, choice, weights)
