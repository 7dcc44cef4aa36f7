"""Low-rank error compensation: the rank-r term that best cancels a layer's output error.

With the quantization error ``E = W - Ŵ`` (``[N, K]``) and the covariance of the layer's inputs
``C = E[x xᵀ]`` (``[K, K]``), the output error of the repaired layer is
``E‖(E - B A) x‖² = tr((E - BA) C (E - BA)ᵀ)``.  For any square root ``C = S Sᵀ`` the minimiser
over rank-r ``BA`` is the rank-r truncated SVD of ``E S`` mapped back by ``S⁻¹`` (the closed form
of EoRA and QERA, which take ``S`` from the eigendecomposition; every root gives the same
``BA``).  Here ``S`` is the Cholesky factor of ``C`` plus a small ridge (directions the
calibration inputs never visit get a negligible weight instead of an infinite inverse), ten
times cheaper than an eigendecomposition, and only the leading singular triplets are computed
(a randomized SVD with oversampling and power iterations).  The spectrum ``σ_i`` gives every
rank's effect: the output error left at rank r is ``‖E S‖² − Σ_{i≤r} σ_i²``, which is what the
repair walk spends its budget on.  A plain SVD of ``E`` ignores which input directions carry
signal and is never better on this objective (tested).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from bitcliff.quant.factors import factor_matrix_bits, quantize_factors
from bitcliff.quant.gptq import gptq_quantize
from bitcliff.quant.qlinear import QuantLinear
from bitcliff.repairs.budget import FP16_BITS
from bitcliff.repairs.registry import (
    GroupRepair,
    MeasuredOption,
    PlanContext,
    Planned,
    Repair,
    cite,
)

#: Ridge added to the covariance before its Cholesky factor, relative to its mean diagonal.
RIDGE = 1e-6
#: Extra random directions and power iterations of the randomized SVD.
OVERSAMPLE, POWER_ITERATIONS = 16, 3


@dataclass
class LowRankSolution:
    """The output-error-optimal factors up to ``max_rank`` and what each rank buys.

    Attributes:
        a: fp32 ``[max_rank, K]`` (``A`` of rank r is ``a[:r]``).
        b: fp32 ``[N, max_rank]`` (``B`` of rank r is ``b[:, :r]``).
        energy: fp64 ``[max_rank]``: the squared singular values ``σ_i²``, i.e. the output error
            (sum over output features, mean over tokens) that rank direction i removes.
        error: the output error with no correction, ``‖E S‖²``.
    """

    a: torch.Tensor
    b: torch.Tensor
    energy: torch.Tensor
    error: float

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A [rank, K], B [N, rank])``."""
        return self.a[:rank], self.b[:, :rank]

    def remaining(self, rank: int) -> float:
        """Output error left at ``rank``."""
        return max(self.error - float(self.energy[:rank].sum()), 0.0)


def whitening(covariance: torch.Tensor) -> torch.Tensor:
    """fp64 lower-triangular ``S`` with ``S Sᵀ = C + ridge``; computed once per input covariance and
    shared by the linears that read that input.  The ridge starts at :data:`RIDGE` of the mean
    diagonal and grows tenfold while the factorisation fails (a covariance accumulated in float32
    can be slightly indefinite in directions the inputs barely visit)."""
    c = covariance.double()
    scale = float(c.diagonal().mean().clamp_min(1e-30))
    eye = torch.eye(len(c), dtype=torch.float64, device=c.device)
    ridge = RIDGE
    while ridge <= 1.0:
        root, info = torch.linalg.cholesky_ex(c + ridge * scale * eye)
        if int(info) == 0:
            return root
        ridge *= 10
    raise ValueError("the input covariance is not positive semi-definite even with a ridge of its mean diagonal")


def lowrank_solution(error: torch.Tensor, covariance: torch.Tensor, max_rank: int,
                     root: torch.Tensor | None = None) -> LowRankSolution:
    """The output-error-optimal rank-``≤ max_rank`` correction of ``error``.

    Args:
        error: ``[N, K]`` weight error ``W - Ŵ`` (any float dtype).
        covariance: ``[K, K]`` input covariance ``E[x xᵀ]`` (any positive scale).
        max_rank: the largest rank that may be used (below ``min(N, K)``).
        root: its :func:`whitening`, when several linears share the input.
    """
    n, k = error.shape
    if tuple(covariance.shape) != (k, k):
        raise ValueError(f"covariance has shape {tuple(covariance.shape)}, the error needs ({k}, {k})")
    if not 1 <= max_rank < min(n, k):
        raise ValueError(f"rank must lie in [1, min(N, K) = {min(n, k)}), got {max_rank}")
    s = whitening(covariance) if root is None else root
    whitened = error.double() @ s
    q = min(max_rank + OVERSAMPLE, min(n, k))
    generator = torch.Generator().manual_seed(0)  # the same factors on every run
    u, sigma, v = _randomized_svd(whitened, q, generator)
    root_sigma = sigma[:max_rank].sqrt()
    b = u[:, :max_rank] * root_sigma  # splitting sigma evenly keeps both fp16 factors in range
    # A = √σ Vᵀ S⁻¹, i.e. Aᵀ solves Sᵀ Aᵀ = V √σ: a triangular solve instead of an inverse
    a = torch.linalg.solve_triangular(s.t(), v[:, :max_rank] * root_sigma, upper=True).t()
    energy = sigma[:max_rank] ** 2
    return LowRankSolution(a.float(), b.float(), energy, float((whitened * whitened).sum()))


def _randomized_svd(m: torch.Tensor, q: int, generator: torch.Generator):
    """Leading ``q`` singular triplets of ``m`` (Halko, Martinsson and Tropp)."""
    # drawn on the host from a seeded generator: the same sketch on every device
    sketch = m @ torch.randn(m.shape[1], q, dtype=m.dtype, generator=generator, device="cpu").to(m.device)
    basis = torch.linalg.qr(sketch).Q
    for _ in range(POWER_ITERATIONS):
        basis = torch.linalg.qr(m.t() @ basis).Q
        basis = torch.linalg.qr(m @ basis).Q
    u_small, sigma, vt = torch.linalg.svd(basis.t() @ m, full_matrices=False)
    return basis @ u_small, sigma, vt.t()


def output_error(error: torch.Tensor, covariance: torch.Tensor) -> float:
    """``tr(E C Eᵀ)``: the mean over inputs of ``‖E x‖²``."""
    e = error.double()
    return float(((e @ covariance.double()) * e).sum())


def lowrank_bits(rank: int, in_features: int, out_features: int, factor_bits: int = FP16_BITS) -> int:
    """What factors ``A [r, K]`` and ``B [N, r]`` store at ``factor_bits`` (16: fp16; 2-4: quantized
    with group scales, :mod:`bitcliff.quant.factors`)."""
    return factor_matrix_bits(rank, in_features, factor_bits) + factor_matrix_bits(rank, out_features, factor_bits)


def fit_factors(error: torch.Tensor, covariance: torch.Tensor, rank: int, factor_bits: int,
                root: torch.Tensor | None = None, solution: LowRankSolution | None = None):
    """The rank-``rank`` correction of ``error`` as it will be stored.

    Args:
        error: ``[N, K]`` weight error; covariance: ``[K, K]`` input covariance; root: its
            :func:`whitening`; solution: the error's :func:`lowrank_solution` when already computed.
        factor_bits: 16 (fp16 factors) or 2-4 (quantized, ``B`` refitted to the rounded ``A``).
    Returns:
        ``(A fp32 [r, K], B fp32 [N, r], quantized)``: the factors the layer applies, and their
        :class:`QuantizedFactors` (None for fp16).
    """
    if solution is None:
        solution = lowrank_solution(error, covariance, rank, root=root)
    a, b = solution.factors(rank)
    if factor_bits == FP16_BITS:
        return a, b, None
    quantized = quantize_factors(a, b, factor_bits, error=error, covariance=covariance)
    return *quantized.dequantize(), quantized


def _fill(available: float, share: dict[int, float], cap: dict[int, float]) -> dict[int, float]:
    """``available`` bits split in proportion to ``share``, no key above its ``cap``: what a
    capped key cannot take goes to the others, in proportion again (water filling)."""
    out, open_keys, left = {}, set(share), available
    while open_keys and left > 0:
        whole = sum(share[k] for k in open_keys)
        full = {k for k in open_keys if left * share[k] / whole >= cap[k]}
        if not full:
            out.update({k: left * share[k] / whole for k in open_keys})
            return out
        for k in full:
            out[k] = cap[k]
            left -= cap[k]
        open_keys -= full
    out.update({k: 0.0 for k in open_keys})
    return out


#: Low-rank factors are allocated in steps of this many ranks, up to :data:`MAX_RANK`.
RANK_STEP = 4
MAX_RANK = 64


class LowRankCompensation(Repair):
    """Compensation: output-error-optimal low-rank factors (a PEFT LoRA adapter beside the checkpoint).

    The plan shares its bits among the decoder layers in proportion to how much error each adds
    (the diagnosis's local error relative to its update, ``local_update_error``) times its weights;
    inside a layer the walk spends that share group by group on the measured spectra, greedily by
    the relative output error removed per bit, ``RANK_STEP`` ranks at a time, carrying what a
    layer leaves to the next.  Options: ``rank`` (one rank everywhere), ``max_rank``.
    """

    name, kind, order, plan_order = "lowrank", "compensation", 20, 10
    weighable = True

    def measured_options(self, ctx: PlanContext, curve) -> list[MeasuredOption]:
        """Every rank in steps of ``RANK_STEP`` up to the plan's ``max_rank`` or the module's
        measured spectrum, the shorter (``diagnose_and_repair`` measures to ``max_rank``), or the one
        ``rank`` asked for, at the plan's factor width."""
        width = ctx.options.get("factor_bits", FP16_BITS)
        rank = ctx.options.get("rank")
        if rank and len(curve.energy) < rank:  # a rank asked for is never silently dropped
            raise ValueError(f"the measurements of {curve.name} cover ranks up to {len(curve.energy)}, the plan asks for "
                             f"{rank}: measure again with max_rank={rank}")
        limit = min(ctx.options.get("max_rank") or MAX_RANK, len(curve.energy))
        ranks = [rank] if rank else range(RANK_STEP, limit + 1, RANK_STEP)
        before = curve.sensitivity * curve.error
        return [MeasuredOption(self.name, curve.name, lowrank_bits(r, curve.in_features, curve.out_features, width),
                               curve.sensitivity * curve.lowrank_error(r), r, before) for r in ranks]

    def plan_measured(self, ctx: PlanContext, chosen: dict[str, MeasuredOption]) -> Planned:
        width = ctx.options.get("factor_bits", FP16_BITS)
        bits = sum(o.cost for o in chosen.values())
        factors = "fp16 factors" if width == FP16_BITS else f"{width}-bit factors"
        ranks = sorted(o.decision for o in chosen.values())
        span = f"rank {ranks[0]}" if ranks[0] == ranks[-1] else f"ranks {ranks[0]}-{ranks[-1]}"
        reason = (f"low-rank compensation on {len(chosen)} modules with {bits / ctx.weights:.4f} bits/weight in "
                  f"{factors}, {span} chosen by the measured loss each removes per bit; "
                  "most per bit: " + cite(chosen, lambda o: f"{o.module} rank {o.decision}"))
        refine = int(ctx.options.get("refine_rounds") or 0)
        if refine:
            reason += f"; {refine} round{'s' * (refine > 1)} of re-quantizing each module around its factors"
        step = {"module_ranks": {name: o.decision for name, o in chosen.items()}, "rank": None,
                "max_rank": max(ranks), "refine_rounds": refine, "factor_bits": width,
                "evidence": {name: o.gain_per_bit for name, o in chosen.items()}}
        return Planned(step, bits, reason)

    def plan(self, ctx: PlanContext, available: float) -> Planned | None:
        rank = ctx.options.get("rank")
        max_rank = rank or ctx.options.get("max_rank", MAX_RANK)
        width = ctx.options.get("factor_bits", FP16_BITS)
        if available <= 0:
            return None
        layer_weights, share = ctx.error_shares()
        local = ctx.diagnosis["signal"]["local_update_error"]
        layer_cheapest: dict[int, int] = {}
        layer_cap = {layer: 0 for layer in layer_weights}  # every module at max_rank: the most a layer can store
        for _, layer, m in ctx.compensable():
            cheapest = lowrank_bits(rank or RANK_STEP, m["in"], m["out"], width)
            layer_cheapest[layer] = min(layer_cheapest.get(layer, cheapest), cheapest)
            layer_cap[layer] += lowrank_bits(max_rank, m["in"], m["out"], width)
        layer_bits = _fill(available, share, layer_cap)
        if rank is not None:  # a fixed rank: every module gets it where the budget allows
            fixed = {layer: 0 for layer in layer_weights}
            for _, layer, m in ctx.compensable():
                fixed[layer] += lowrank_bits(rank, m["in"], m["out"], width)
            if sum(fixed.values()) <= available:
                layer_bits = fixed
        layer_bits = {k: v for k, v in layer_bits.items() if v >= layer_cheapest[k]}
        if not layer_bits:
            return None
        ranked = sorted(layer_bits, key=lambda k: -layer_bits[k] / layer_weights[k])[:5]
        planned = sum(layer_bits.values())
        factors = "fp16 factors" if width == FP16_BITS else f"{width}-bit factors"
        reason = (f"low-rank compensation with {planned / ctx.weights:.4f} bits/weight in {factors}, shared "
                  "among layers by the error each adds (local error relative to its update) times its weights; most "
                  "per weight: " + ", ".join(f"layer {k} ({local[k]:.3f})" for k in ranked)
                  + ("" if rank is None else f"; rank {rank} on every module"))
        if planned < available * (1 - 1e-9) and planned >= sum(layer_cap.values()) * (1 - 1e-9):
            reason += (f"; that is all it can store: rank {max_rank} on every module, the most this repair "
                       f"fits ({(available - planned) / ctx.weights:.4f} bits/weight of the budget left unspent)")
        refine = int(ctx.options.get("refine_rounds") or 0)
        if refine:
            reason += f"; {refine} round{'s' * (refine > 1)} of re-quantizing each module around its factors"
        step = {"layer_bits": {str(k): v for k, v in layer_bits.items()}, "rank": rank, "max_rank": max_rank,
                "refine_rounds": refine, "factor_bits": width}
        return Planned(step, sum(layer_bits.values()), reason)

    def cheapest(self, ctx: PlanContext) -> float | None:
        width = ctx.options.get("factor_bits", FP16_BITS)
        return min(lowrank_bits(RANK_STEP, m["in"], m["out"], width) for m in ctx.modules.values())

    def start_layer(self, step: dict, state: dict, index: int) -> None:
        # This layer's share plus what earlier layers left unspent.
        state["budget"] = state.get("budget", 0.0) + step.get("layer_bits", {}).get(str(index), 0.0)

    def apply(self, step: dict, state: dict, group: GroupRepair) -> None:
        if "module_ranks" in step:  # the global allocator chose every module's rank
            self._spend(step, group, float("inf"))
            return
        if state.get("budget", 0.0) <= 0:
            return
        share = state["budget"] * group.weights / max(group.layer_weights, 1)
        state["budget"] -= self._spend(step, group, share)

    def _spend(self, step: dict, group: GroupRepair, share: float) -> float:
        """Spend up to ``share`` bits on the group's factors; returns the bits spent."""
        solutions, energy, errors = {}, {}, {}
        shared = whitening(group.covariance)  # one factorisation for the whole group
        for rel in group.members:
            module = group.modules[rel]
            if not isinstance(module, QuantLinear) or group.entries[rel].restored_bits is not None:
                continue
            chosen = step["module_ranks"].get(f"{group.name}.{rel}") if "module_ranks" in step else None
            if "module_ranks" in step and not chosen:
                continue  # the allocator gave it no factors
            limit = min(step["max_rank"], min(module.in_features, module.out_features) - 1)
            if limit >= 1:
                error = group.targets[rel] - group.weight(rel)
                errors[rel] = error  # kept for rounding the factors: no second dequantization
                solutions[rel] = (module, lowrank_solution(error, group.covariance, limit, root=shared))
                if chosen is None:  # the greedy's unit: output error relative to E‖W x‖²
                    energy[rel] = max(output_error(group.targets[rel], group.covariance), 1e-30)
        ranks = {rel: 0 for rel in solutions}
        width = step.get("factor_bits", FP16_BITS)  # plans made before quantized factors: fp16
        spent = 0.0
        if "module_ranks" in step:
            for rel, (module, solution) in solutions.items():
                ranks[rel] = min(step["module_ranks"].get(f"{group.name}.{rel}", 0), solution.a.shape[0])
                spent += lowrank_bits(ranks[rel], module.in_features, module.out_features, width) if ranks[rel] else 0
        elif step["rank"] is not None:  # one rank everywhere, as far as the share allows
            for rel, (module, _) in solutions.items():
                cost = lowrank_bits(step["rank"], module.in_features, module.out_features, width)
                if spent + cost <= share + 1e-6:
                    ranks[rel], spent = step["rank"], spent + cost
        else:  # greedy on the measured relative output error removed per bit, RANK_STEP ranks at a time
            while True:
                best, best_gain = None, 0.0
                for rel, (module, solution) in solutions.items():
                    r = ranks[rel]
                    size = min(RANK_STEP, solution.a.shape[0] - r)
                    cost = lowrank_bits(size, module.in_features, module.out_features, width)
                    if size <= 0 or spent + cost > share:
                        continue
                    # output error removed relative to the output itself: what the next norm sees
                    gain = (solution.remaining(r) - solution.remaining(r + size)) / energy[rel]
                    gain = gain * (module.in_features * module.out_features) / cost
                    if gain > best_gain:
                        best, best_gain = rel, gain
                if best is None:
                    break
                module, solution = solutions[best]
                size = min(RANK_STEP, solution.a.shape[0] - ranks[best])
                ranks[best] += size
                spent += lowrank_bits(size, module.in_features, module.out_features, width)
        for rel, r in ranks.items():
            if r:
                module, solution = solutions[rel]
                factors = fit_factors(errors[rel], group.covariance, r, width, root=shared, solution=solution)
                if step.get("refine_rounds"):
                    module, factors = _refine(group, rel, module, factors, step["refine_rounds"], shared, width)
                    group.modules[rel] = module
                a, b, quantized = factors
                module.set_lowrank(a, b, quantized=quantized)
                group.entries[rel].rank = r
                group.entries[rel].bits += lowrank_bits(r, module.in_features, module.out_features, width)
        return spent


def _refine(group: GroupRepair, rel: str, module: QuantLinear, factors: tuple, rounds: int, root: torch.Tensor,
            factor_bits: int) -> tuple[QuantLinear, tuple]:
    """Alternating refinement: ``rounds`` times, re-quantize ``W − BA`` by GPTQ on the group's
    inputs at the module's own setting, then refit the factors (same rank) to the new error.  A
    round is kept only when it lowers the output error ``tr((W − Ŵ − BA) C (W − Ŵ − BA)ᵀ)``, so
    refinement never makes a module worse on its calibration inputs.  A module holding sparse
    outliers keeps its codes (their corrections belong to those codes).

    ``factors``, and what it returns beside the module holding the best codes (a new
    ``QuantLinear`` when a round was kept), are :func:`fit_factors` 's ``(A, B, quantized)`` at
    ``factor_bits``."""
    if module.outlier_values is not None:
        return module, factors
    target, covariance = group.targets[rel], group.covariance
    name = f"{group.name}.{rel}"
    config = dataclasses.replace(group.config.for_module(name), method="gptq")
    a, b, _ = factors
    best = output_error(target - module.dequantize() - b @ a, covariance)
    for _ in range(rounds):
        result = gptq_quantize(target - b @ a, group.statistics.hessian(), config, name=name)
        dequantized = result.qweight.dequantize()
        refitted = fit_factors(target - dequantized, covariance, a.shape[0], factor_bits, root=root)
        error = output_error(target - dequantized - refitted[1] @ refitted[0], covariance)
        if error >= best:
            break
        best, factors = error, refitted
        a, b, _ = factors
        bias = module.bias.float() if module.bias is not None else None
        module = QuantLinear.from_quantized(result.qweight, config.group_size, bias, name).to(target.device)
    return module, factors


REPAIR = LowRankCompensation()
