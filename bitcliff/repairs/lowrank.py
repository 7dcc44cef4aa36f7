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

from dataclasses import dataclass

import torch

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
    eye = torch.eye(len(c), dtype=torch.float64)
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
    sketch = m @ torch.randn(m.shape[1], q, dtype=m.dtype, generator=generator)
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
