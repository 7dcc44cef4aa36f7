"""Low-rank error compensation: the rank-r term that best cancels a layer's output error.

With the quantization error ``E = W - Ŵ`` (``[N, K]``) and the covariance of the layer's inputs
``C = E[x xᵀ]`` (``[K, K]``), the output error of the repaired layer is
``E‖(E - B A) x‖² = tr((E - BA) C (E - BA)ᵀ)``.  Writing ``C = S Sᵀ`` (``S = Q Λ^½`` from the
eigendecomposition), the minimiser over rank-r ``BA`` is the rank-r truncated SVD of ``E S``
mapped back by ``S⁻¹`` (the closed form of EoRA and QERA).  Its spectrum ``σ_i`` gives every
rank's effect exactly: the output error left at rank r is ``Σ_{i>r} σ_i²``, which is what the
repair walk spends its budget on.  A plain SVD of ``E`` ignores which input directions carry
signal and is never better on this objective (tested).

Eigenvalues below a relative tolerance (directions the calibration inputs never visit) are
dropped from ``S⁻¹`` instead of being inverted into huge values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LowRankSolution:
    """The output-error-optimal factors up to ``max_rank`` and what each rank buys.

    Attributes:
        a: fp32 ``[max_rank, K]`` (``A`` of rank r is ``a[:r]``).
        b: fp32 ``[N, max_rank]`` (``B`` of rank r is ``b[:, :r]``).
        energy: fp64 ``[min(N, K)]``: the squared singular values ``σ_i²``, i.e. the output error
            (sum over output features, mean over tokens) that rank direction i removes.
        error: fp64 scalar: the output error with no correction, ``Σ σ_i²``.
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
        return float(self.energy[rank:].sum())


def whitening(covariance: torch.Tensor, rtol: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """``(S, S⁺)`` with ``C = S Sᵀ`` and ``S⁺`` its truncated pseudo-inverse, fp64 ``[K, K]``;
    computed once per input covariance and shared by the linears that read that input."""
    eigenvalues, vectors = torch.linalg.eigh(covariance.double())
    kept = eigenvalues > eigenvalues[-1].clamp_min(0.0) * rtol
    root = torch.where(kept, eigenvalues.clamp_min(0.0).sqrt(), torch.zeros_like(eigenvalues))
    inverse_root = torch.where(kept, 1.0 / root.clamp_min(1e-300), torch.zeros_like(eigenvalues))
    return vectors * root, inverse_root[:, None] * vectors.t()


def lowrank_solution(error: torch.Tensor, covariance: torch.Tensor | tuple, max_rank: int) -> LowRankSolution:
    """The output-error-optimal rank-``≤ max_rank`` correction of ``error``.

    Args:
        error: ``[N, K]`` weight error ``W - Ŵ`` (any float dtype).
        covariance: ``[K, K]`` input covariance ``E[x xᵀ]`` (any positive scale), or its
            :func:`whitening` when several linears share the input.
        max_rank: the largest rank that may be used (below ``min(N, K)``).
    """
    n, k = error.shape
    s, s_inv = covariance if isinstance(covariance, tuple) else (None, None)
    if s is None:
        if tuple(covariance.shape) != (k, k):
            raise ValueError(f"covariance has shape {tuple(covariance.shape)}, the error needs ({k}, {k})")
        s, s_inv = whitening(covariance)
    if not 1 <= max_rank < min(n, k):
        raise ValueError(f"rank must lie in [1, min(N, K) = {min(n, k)}), got {max_rank}")
    u, sigma, vt = torch.linalg.svd(error.double() @ s, full_matrices=False)
    root = sigma[:max_rank].sqrt()
    b = u[:, :max_rank] * root  # splitting sigma evenly keeps both fp16 factors in range
    a = (root[:, None] * vt[:max_rank]) @ s_inv
    energy = sigma * sigma
    return LowRankSolution(a.float(), b.float(), energy, float(energy.sum()))


def output_error(error: torch.Tensor, covariance: torch.Tensor) -> float:
    """``tr(E C Eᵀ)``: the mean over inputs of ``‖E x‖²``."""
    e = error.double()
    return float(((e @ covariance.double()) * e).sum())
