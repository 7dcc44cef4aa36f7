"""The closed forms of the repairs, on random matrices: each against its definition."""

from __future__ import annotations

import pytest
import torch

from bitcliff.repairs.bias import bias_shift
from bitcliff.repairs.lowrank import lowrank_solution, output_error
from bitcliff.repairs.norm import fold_into_norm, group_error, norm_scales


def _covariance(k: int, seed: int = 0) -> torch.Tensor:
    """A covariance with a few dominant, correlated directions, like real activations."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(k, k, generator=g, dtype=torch.float64)
    scales = torch.logspace(2, -2, k, dtype=torch.float64)
    return (basis * scales) @ (basis * scales).t() / k


def test_lowrank_beats_plain_svd_and_reports_its_own_error_exactly():
    g = torch.Generator().manual_seed(1)
    n, k, rank = 48, 64, 8
    error = torch.randn(n, k, generator=g, dtype=torch.float64)
    cov = _covariance(k)
    solution = lowrank_solution(error, cov, max_rank=16)
    a, b = solution.factors(rank)
    ours = output_error(error - b.double() @ a.double(), cov)
    u, s, vt = torch.linalg.svd(error)
    plain = output_error(error - (u[:, :rank] * s[:rank]) @ vt[:rank], cov)
    assert ours < 0.9 * plain  # weighting by the inputs matters when they are anisotropic
    assert ours == pytest.approx(solution.remaining(rank), rel=1e-3)  # fp32 factors, randomized SVD
    assert solution.error == pytest.approx(output_error(error, cov), rel=1e-5)  # up to the small ridge
    remaining = [solution.remaining(r) for r in range(17)]
    assert all(x >= y for x, y in zip(remaining, remaining[1:]))  # every rank helps
    with pytest.raises(ValueError, match="rank must lie in"):
        lowrank_solution(error, cov, max_rank=48)
    with pytest.raises(ValueError, match="covariance has shape"):
        lowrank_solution(error, cov[:10, :10], max_rank=4)


def test_lowrank_ignores_directions_the_inputs_never_visit():
    k = 32
    cov = torch.zeros(k, k, dtype=torch.float64)
    cov[:8, :8] = _covariance(8)  # inputs live in the first 8 coordinates only
    error = torch.randn(16, k, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    solution = lowrank_solution(error, cov, max_rank=8)
    a, b = solution.factors(8)
    correction = b.double() @ a.double()
    assert torch.isfinite(correction).all()
    # what the inputs never see is left about as it was, not blown up by an inverted zero variance
    assert correction[:, 8:].norm() <= 2 * error[:, 8:].norm()
    assert output_error(error - correction, cov) <= 1e-4 * solution.error


def test_bias_shift_removes_a_planted_mean_error_exactly():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(12, 20, generator=g)
    planted = 0.1 * torch.randn(12, 1, generator=g) * torch.ones(1, 20)  # an error whose mean output is not 0
    w_q = w + planted + 0.01 * torch.randn(12, 20, generator=g)
    x = torch.randn(500, 20, generator=g) + 2.0
    shift = bias_shift(w, w_q, x.mean(0))
    torch.testing.assert_close((x @ w_q.t() + shift).mean(0), (x @ w.t()).mean(0), rtol=1e-5, atol=1e-5)


def test_norm_scales_minimise_the_group_error():
    g = torch.Generator().manual_seed(4)
    k = 24
    cov = _covariance(k, seed=5)
    targets = [torch.randn(16, k, generator=g, dtype=torch.float64) for _ in range(2)]
    planted = 1.0 + 0.2 * torch.randn(k, generator=g, dtype=torch.float64)
    quantized = [t / planted[None, :] + 0.01 * torch.randn_like(t) for t in targets]  # off by a per-channel gain
    gamma = norm_scales(targets, quantized, cov)
    assert group_error(targets, quantized, cov, gamma) < 0.05 * group_error(targets, quantized, cov)
    torch.testing.assert_close(gamma, planted, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("kind", ["llama", "gemma3", "layernorm"])
def test_scales_fold_into_either_norm_convention(kind):
    if kind == "llama":
        from transformers.models.llama.modeling_llama import LlamaRMSNorm as Norm
    elif kind == "gemma3":
        from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm as Norm
    else:  # BLOOM's and GPT-NeoX's, with a bias the scale applies to as well
        Norm = torch.nn.LayerNorm
    norm = Norm(8)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        if kind == "layernorm":
            norm.bias.uniform_(-0.5, 0.5)
    x = torch.randn(4, 8)
    gamma = torch.linspace(0.8, 1.2, 8)
    expected = norm(x) * gamma
    fold_into_norm(norm, gamma)
    torch.testing.assert_close(norm(x), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="no per-channel weight"):
        fold_into_norm(torch.nn.Identity(), gamma)
