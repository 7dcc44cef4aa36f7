"""Refit GPTQ's scales to its codes: the least-squares scales for the output error.

GPTQ fixes each group's grid (scale, zero) first and then chooses the codes, compensating every
rounding error in the columns still to come.  Once all codes are chosen, the scales it started
from are no longer the best ones for them: with the codes ``q`` and zero points ``z`` held fixed,
the layer's output error on the calibration data,

    ``(w − ŵ) H (w − ŵ)ᵀ``  with  ``ŵ_i = s_{g(i)} (q_i − z_{g(i)})``,

is a quadratic in the row's scales ``s`` (one per group).  Its minimizer solves the small
``G × G`` system ``A s = b`` with ``A_gh = u_gᵀ H u_h`` and ``b_g = u_gᵀ H w``, where ``u_g``
is ``q − z`` restricted to the columns of group ``g``.  Building every row's system costs about
``N K²`` multiply-adds, the same order as one pass of GPTQ's error propagation.

A row takes its new scales only if they are all positive and finite *after* rounding to fp16
(what the checkpoint stores) and lower that row's error; otherwise it keeps GPTQ's scales, so
the refit never makes a row worse on the calibration data.  Codes, zero points and ``g_idx``
are unchanged, so the checkpoint format is too.
"""

from __future__ import annotations

import torch

from bitcliff.quant.qweight import QuantizedWeight

ROW_CHUNK = 4096  # rows per batch of systems: bounds the [rows, K] float32 temporaries
# Relative ridge on each row's system: keeps the solve defined when two groups' code patterns
# are nearly collinear under H, far below any scale the error could resolve.
RIDGE = 1e-9


def refit_scales(
    weight: torch.Tensor, hessian: torch.Tensor, qweight: QuantizedWeight
) -> tuple[QuantizedWeight, torch.Tensor]:
    """Least-squares scales for GPTQ's codes.

    Args:
        weight: float ``[N, K]`` weight that was quantized (``nn.Linear`` orientation).
        hessian: float32 ``[K, K]`` ``2 X Xᵀ / n`` it was quantized against.
        qweight: GPTQ's result for ``weight``: codes ``[K, N]``, fp16 scales ``[G, N]``.
    Returns:
        ``(refitted, changed)``: a :class:`QuantizedWeight` with new fp16 scales and the same
        codes, zeros and ``g_idx``; and bool ``[N]``, the rows whose scales changed.
    """
    n_rows, k = weight.shape
    if hessian.shape != (k, k) or qweight.codes.shape != (k, n_rows):
        raise ValueError(
            f"weight {tuple(weight.shape)}, Hessian {tuple(hessian.shape)} and codes "
            f"{tuple(qweight.codes.shape)} do not describe the same layer"
        )
    weight, h = weight.detach(), hessian.detach().float()
    g_idx = qweight.g_idx.long().to(weight.device)
    n_groups = qweight.scales.shape[0]
    old = qweight.scales.t().double()  # [N, G]
    new = old.clone()
    for r0 in range(0, n_rows, ROW_CHUNK):
        r1 = min(r0 + ROW_CHUNK, n_rows)
        new[r0:r1] = _refit_rows(
            weight[r0:r1].float(), h, qweight.codes[:, r0:r1], qweight.zeros[:, r0:r1], old[r0:r1], g_idx, n_groups
        )
    changed = (new != old).any(dim=1)
    scales = new.t().to(torch.float16).contiguous()
    refitted = QuantizedWeight(qweight.codes, scales, qweight.zeros, qweight.g_idx, qweight.bits)
    return refitted, changed


def _group_summer(g_idx: torch.Tensor, n_groups: int):
    """A function mapping ``[R, K]`` to its sums over each group's columns, ``[R, G]``."""
    k = g_idx.numel()
    size = -(-k // n_groups)
    contiguous = k % n_groups == 0 and torch.equal(g_idx, torch.arange(k, device=g_idx.device) // size)
    if contiguous:  # the usual layout: a reshape, no arithmetic wasted on the other groups
        return lambda x: x.view(x.shape[0], n_groups, size).sum(dim=2)
    member = torch.nn.functional.one_hot(g_idx, n_groups).float()  # [K, G] column -> group
    return lambda x: x @ member


def _refit_rows(
    w: torch.Tensor,
    h: torch.Tensor,
    codes: torch.Tensor,
    zeros: torch.Tensor,
    old: torch.Tensor,
    g_idx: torch.Tensor,
    n_groups: int,
) -> torch.Tensor:
    """New float64 scales ``[R, G]`` for rows ``w`` (float32 ``[R, K]``); ``old``: ``[R, G]``."""
    rows = w.shape[0]
    u = (codes.float() - zeros.float()[g_idx]).t()  # [R, K]: the integer multipliers of the scales
    group_sum = _group_summer(g_idx, n_groups)
    a = torch.zeros(rows, n_groups, n_groups, dtype=torch.float64, device=w.device)
    for g in range(n_groups):
        cols = (g_idx == g).nonzero().squeeze(1)
        if cols.numel() == 0:
            continue
        coupling = u[:, cols] @ h[cols]  # [R, K]: u_g H for every row
        a[:, g] = group_sum(coupling * u).double()
    b = group_sum((w @ h) * u).double()

    # A group whose codes all sit at its zero point has no say in the error: pin its scale.
    diag = a.diagonal(dim1=1, dim2=2)
    scale_of_a = diag.abs().amax(dim=1, keepdim=True).clamp_min(1e-300)
    idle = diag <= 1e-12 * scale_of_a
    system = a.masked_fill(idle.unsqueeze(1) | idle.unsqueeze(2), 0.0)
    system.diagonal(dim1=1, dim2=2).add_(RIDGE * scale_of_a + idle.double())
    rhs = torch.where(idle, old, b)
    solution, info = torch.linalg.solve_ex(system, rhs.unsqueeze(-1))
    fitted = solution.squeeze(-1).to(torch.float16).double()  # what would be stored

    def error(s: torch.Tensor) -> torch.Tensor:  # row error up to the constant w H wᵀ
        return (s.unsqueeze(1) @ a @ s.unsqueeze(-1)).squeeze(-1).squeeze(-1) - 2 * (b * s).sum(dim=1)

    ok = (info == 0) & torch.isfinite(fitted).all(dim=1) & (fitted > 0).all(dim=1)
    fitted = torch.where(ok[:, None], fitted, old)
    better = ok & (error(fitted) < error(old))
    return torch.where(better[:, None], fitted, old)
