"""The elementary measures every analysis uses, each on plain tensors.

Per-token measures take ``[..., T, d]`` tensors and return fp64 ``[..., T]``; statistics over
examples take 1-D sequences.  Distances are computed in fp64 so that tiny 4-bit errors on
large residual streams do not vanish in rounding.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

_EPS = 1e-30


def relative_error(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``||x - ref|| / ||ref||`` over the last dimension."""
    x, ref = x.double(), ref.double()
    return (x - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(_EPS)


def squared_error_and_norm(x: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """``(sum ||x - ref||^2, sum ||ref||^2)`` over all tokens: accumulate both, then take the ratio,
    for an error that is not dominated by a few tokens with tiny norms."""
    x, ref = x.double(), ref.double()
    return float((x - ref).pow(2).sum()), float(ref.pow(2).sum())


def cosine(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Cosine similarity over the last dimension."""
    return torch.nn.functional.cosine_similarity(x.double(), ref.double(), dim=-1, eps=1e-12)


def kl_divergence(ref_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """``KL(softmax(ref) || softmax(x))`` in nats over the last dimension."""
    log_p = torch.log_softmax(ref_logits.double(), dim=-1)
    log_q = torch.log_softmax(logits.double(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)


def rank_of(logits: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    """Rank (0 = top) of ``token`` (int64 ``[...]``) under ``logits`` (``[..., vocab]``)."""
    chosen = logits.gather(-1, token[..., None])
    return (logits > chosen).sum(dim=-1)


def js_divergence(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Jensen–Shannon divergence in bits (0 = same, 1 = disjoint) of probability rows
    (last dimension sums to 1)."""
    p, q = p.double(), q.double()
    m = 0.5 * (p + q)

    def kl(a: torch.Tensor) -> torch.Tensor:
        return torch.where(a > 0, a * (a.clamp_min(_EPS).log2() - m.clamp_min(_EPS).log2()), 0.0).sum(dim=-1)

    return (0.5 * kl(p) + 0.5 * kl(q)).clamp(0.0, 1.0)


def _ranks(values: Sequence[float]) -> torch.Tensor:
    """Average ranks (ties share the mean rank), 1-based, fp64."""
    x = torch.as_tensor(values, dtype=torch.float64, device="cpu")
    order = torch.argsort(x, stable=True)
    ranks = torch.empty_like(x)
    sorted_x = x[order]
    i = 0
    n = len(x)
    while i < n:
        j = i
        while j + 1 < n and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation; NaN when either side is constant or fewer than 3 points."""
    a = torch.as_tensor(x, dtype=torch.float64, device="cpu")
    b = torch.as_tensor(y, dtype=torch.float64, device="cpu")
    if a.shape != b.shape or a.dim() != 1:
        raise ValueError(f"pearson needs two 1-D sequences of one length, got {tuple(a.shape)} and {tuple(b.shape)}")
    if len(a) < 3:
        return math.nan
    a, b = a - a.mean(), b - b.mean()
    denom = float(a.norm() * b.norm())
    return float((a * b).sum()) / denom if denom > 0 else math.nan


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation (Pearson on average ranks)."""
    if len(x) != len(y):
        raise ValueError(f"spearman needs sequences of one length, got {len(x)} and {len(y)}")
    return pearson(_ranks(x), _ranks(y)) if len(x) >= 3 else math.nan


def auroc(scores: Sequence[float], labels: Sequence[bool]) -> float:
    """Area under the ROC curve of ``scores`` for the positive ``labels`` (Mann–Whitney U with
    average ranks for ties); NaN when one class is empty."""
    labels_t = torch.as_tensor(labels, dtype=torch.bool, device="cpu")
    n_pos, n_neg = int(labels_t.sum()), int((~labels_t).sum())
    if len(scores) != len(labels_t):
        raise ValueError(f"auroc: {len(scores)} scores for {len(labels_t)} labels")
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = _ranks(scores)
    return (float(ranks[labels_t].sum()) - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def top_fraction(values: Sequence[float], fraction: float) -> list[bool]:
    """Which entries are among the top ``fraction`` (at least one entry)."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    x = torch.as_tensor(values, dtype=torch.float64, device="cpu")
    k = max(1, int(round(fraction * len(x))))
    top = torch.zeros(len(x), dtype=torch.bool, device="cpu")
    top[torch.topk(x, k).indices] = True
    return top.tolist()


def spearman_interval(rho: float, n: int, z: float = 1.96) -> tuple[float, float] | None:
    """Approximate 95 % interval of a Spearman correlation over ``n`` points (Fisher's z with
    Bonett and Wright's standard error ``sqrt(1 + rho^2 / 2) / sqrt(n - 3)``); None below 5 points."""
    if n < 5 or math.isnan(rho):
        return None
    r = max(min(rho, 0.999999), -0.999999)
    centre, half = math.atanh(r), z * math.sqrt(1.0 + r * r / 2.0) / math.sqrt(n - 3)
    return math.tanh(centre - half), math.tanh(centre + half)


def auroc_interval(a: float, n_pos: int, n_neg: int, z: float = 1.96) -> tuple[float, float] | None:
    """Approximate 95 % interval of an AUROC (Hanley and McNeil's standard error), clipped to [0, 1]."""
    if n_pos < 1 or n_neg < 1 or math.isnan(a):
        return None
    q1, q2 = a / (2.0 - a), 2.0 * a * a / (1.0 + a)
    variance = (a * (1 - a) + (n_pos - 1) * (q1 - a * a) + (n_neg - 1) * (q2 - a * a)) / (n_pos * n_neg)
    half = z * math.sqrt(max(variance, 0.0))
    return max(0.0, a - half), min(1.0, a + half)
