"""Norm recalibration: a per-channel rescale of the norm that feeds a group of linears, chosen in
closed form so that the quantized group's outputs best match the full-precision ones.

The linears ``W_i`` (``[N_i, K]``, quantized ``Ŵ_i``) of a share group read ``x = g ∘ x̂``, the
output of a norm with weight ``g``.  Scaling the norm weight by ``γ`` (``[K]``) feeds them
``γ ∘ x``; the output error over the group is

    f(γ) = Σ_i E‖W_i x − Ŵ_i (γ ∘ x)‖² = Σ_i tr((W_i − Ŵ_i Γ) C (W_i − Ŵ_i Γ)ᵀ),  Γ = diag(γ),

a quadratic in γ whose minimiser solves ``(C ⊙ Σ_i Ŵ_iᵀŴ_i) γ = diag(Σ_i Ŵ_iᵀ W_i C)``.  A small
ridge towards γ = 1 keeps directions the inputs barely visit where they were.  The repair costs
no storage: γ is folded into the norm's own weight.

It runs after the group's compensation, on the weights the compensation leaves (``Ŵ_i`` is the
effective weight: codes, low-rank term and outliers), so it can only lower what they reached.
Run first, γ fitted the uncorrected codes and the compensation then had to correct around it:
on SmolLM2 GPTQ W3 with +0.25 bits of 4-bit low-rank factors, ppl 34.01 / 163.73 (wiki /
Canterbury) with the norm first, 33.00 / 154.60 without it, 32.83 / 152.73 with it last
(docs/repair.md).
"""

from __future__ import annotations

import torch
from torch import nn

from bitcliff.repairs.registry import GroupRepair, PlanContext, Planned, Repair

#: Ridge towards γ = 1, relative to the mean diagonal of the system.
RIDGE = 1e-4


def norm_scales(targets: list[torch.Tensor], quantized: list[torch.Tensor], covariance: torch.Tensor) -> torch.Tensor:
    """fp64 ``[K]`` γ minimising the group's output error (module docstring).

    Args:
        targets: the full-precision ``[N_i, K]`` weights of the group.
        quantized: the effective quantized ``[N_i, K]`` weights, same order.
        covariance: ``[K, K]`` ``E[x xᵀ]`` of the norm's output.
    """
    c = covariance.double()
    gram = sum(q.double().t() @ q.double() for q in quantized)
    cross = sum(q.double().t() @ w.double() for q, w in zip(quantized, targets))
    system = c * gram
    rhs = (cross * c).sum(dim=1)
    ridge = RIDGE * float(system.diagonal().mean())
    eye = torch.eye(len(rhs), dtype=torch.float64, device=c.device)
    return torch.linalg.solve(system + ridge * eye, rhs + ridge)


def group_error(targets, quantized, covariance: torch.Tensor, scales: torch.Tensor | None = None) -> float:
    """``f(γ)`` of the module docstring (γ = 1 when ``scales`` is None)."""
    c = covariance.double()
    total = 0.0
    for w, q in zip(targets, quantized):
        qs = q.double() if scales is None else q.double() * scales[None, :]
        e = w.double() - qs
        total += float(((e @ c) * e).sum())
    return total


def has_gain(module: nn.Module, channels: int) -> bool:
    """Whether ``module`` has a per-channel weight of ``channels`` (a norm's gain): the input of
    some linears is an activation's output (BLOOM's and GPT-NeoX's GELU before the MLP's down
    projection), which has none to rescale."""
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and tuple(weight.shape) == (channels,)


@torch.no_grad()
def fold_into_norm(norm: nn.Module, scales: torch.Tensor) -> None:
    """Scale ``norm``'s output per channel by folding ``scales`` into its weight.

    Norms store their gain either directly (``y = w ∘ x̂ (+ b)``, Llama's RMSNorm, BLOOM's and
    GPT-NeoX's LayerNorm, whose bias is scaled too) or as an offset from one (``y = (1 + w) ∘ x̂``,
    Gemma); which one is found by probing the module, and the result is checked on a probe input.

    Raises:
        ValueError: naming the norm class when neither convention reproduces the scaled output.
    """
    if not has_gain(norm, len(scales)):
        raise ValueError(f"{type(norm).__name__} has no per-channel weight of {tuple(scales.shape)} to fold into")
    weight = norm.weight
    bias = getattr(norm, "bias", None)
    bias = bias if isinstance(bias, torch.Tensor) and bias.shape == weight.shape else None
    probe = torch.randn(3, len(scales), generator=torch.Generator().manual_seed(0), device="cpu").to(weight)
    expected = norm(probe) * scales.to(weight)
    original = weight.detach().clone()
    original_bias = None if bias is None else bias.detach().clone()
    gamma = scales.to(weight)
    for candidate in (original * gamma, (1.0 + original) * gamma - 1.0):
        weight.copy_(candidate)
        if bias is not None:
            bias.copy_(original_bias * gamma)
        if torch.allclose(norm(probe), expected, rtol=1e-4, atol=1e-5):
            return
    weight.copy_(original)
    if bias is not None:
        bias.copy_(original_bias)
    raise ValueError(f"cannot fold a per-channel scale into {type(norm).__name__}: neither w nor 1 + w is its gain")


class NormRecalibration(Repair):
    """Free compensation: every norm that feeds a share group, rescaled where that lowers the group's
    output error."""

    name, kind, order, plan_order = "norm", "free", 25, 0  # after compensation (module docstring)

    def plan(self, ctx: PlanContext, available: float) -> Planned:
        return Planned({}, 0.0, "norm recalibration on every norm that feeds quantized linears: free (folded into "
                                "the norm weights)")

    def apply(self, step: dict, state: dict, group: GroupRepair) -> None:
        if group.source is None:
            return
        norm = group.layer.get_submodule(group.source)
        if not has_gain(norm, group.covariance.shape[0]):
            return  # fed by an activation, not a norm
        quantized = [group.weight(rel) for rel in group.members]
        weights = [group.targets[rel] for rel in group.members]
        gamma = norm_scales(weights, quantized, group.covariance)
        before = group_error(weights, quantized, group.covariance)
        after = group_error(weights, quantized, group.covariance, gamma)
        if not after < before:
            return
        fold_into_norm(norm, gamma)
        group.record.norms.append({"norm": f"{group.name}.{group.source}",
                                   "feeds": [f"{group.name}.{m}" for m in group.members],
                                   "error_before": before, "error_after": after})
        # The group's inputs are now γ ∘ x: statistics and targets in that scale.
        group.covariance = group.covariance * gamma[:, None] * gamma[None, :]
        group.mean = group.mean * gamma
        group.targets = {rel: w / gamma.float()[None, :] for rel, w in group.targets.items()}
        group.scales.update({rel: gamma.float() for rel in group.members})


REPAIR = NormRecalibration()
