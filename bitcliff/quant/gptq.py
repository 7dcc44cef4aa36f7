"""GPTQ for one weight matrix, as small typed functions.

GPTQ (Frantar et al., 2022) quantizes the columns of ``W`` (``[N, K]``, ``nn.Linear``
orientation) one at a time and spreads each column's rounding error over the columns not yet
quantized, weighted by the inverse of the layer-input Hessian ``H = 2 X Xᵀ / n``.  That
minimizes the layer's output error ``‖(W − Ŵ) X‖²`` instead of the weight error.

The pieces, in the order a caller uses them:

- :class:`~bitcliff.statistics.HessianAccumulator` (its own module, shared with the repairs) sums
  ``x xᵀ`` over calibration tokens in float32.
- :func:`gptq_quantize` solves one weight against one Hessian and returns a
  :class:`GPTQResult` (loss, :class:`QuantizedWeight`, dampening used).  Layers that read the
  same input (q/k/v, gate/up) share one Hessian: stacking their rows and solving once is exact,
  since GPTQ treats rows independently; :func:`split_result` cuts the result back apart.
- :func:`proxy_loss` measures ``tr(ΔW H ΔWᵀ)``, the output error GPTQ minimizes.

Codes are chosen on exactly the grid that is stored (fp16 scales, integer zeros, see
:mod:`bitcliff.quant.grid`), so ``QuantizedWeight.dequantize()`` reproduces bit for bit the
weight that GPTQ's error feedback assumed.  Nothing here prints; a failed Cholesky factorization
is retried with stronger dampening (logged), and as a last resort the weight falls back to RTN
with a warning that names it.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from bitcliff.kernels.pack import default_g_idx, num_groups
from bitcliff.quant.config import QuantConfig
from bitcliff.quant.grid import fit_grid, quantize_codes
from bitcliff.quant.outliers import SparseOutliers
from bitcliff.quant.qweight import QuantizedWeight
from bitcliff.quant.refit import refit_scales
from bitcliff.quant.finite import check_finite
from bitcliff.quant.rtn import quantize_rtn

log = logging.getLogger(__name__)

BLOCK_SIZE = 128  # columns per lazy batch update (GPTQ §3.3); errors reach later blocks in one matmul
DAMP_STEP = 10.0  # dampening grows by this factor after a failed factorization ...
DAMP_CAP = 1.0  # ... up to this fraction of mean(diag(H)); beyond it the weight falls back to RTN
@dataclass
class GPTQResult:
    """Outcome of :func:`gptq_quantize` for one (possibly stacked) weight.

    Attributes:
        qweight: codes and grid, contiguous ``g_idx`` unless act-order with dynamic groups.
        loss: GPTQ objective ``Σ (w − q)² / [H⁻¹]_jj / 2`` summed over rows (None after an RTN
            fallback, where it is not defined).
        row_loss: float32 ``[N]`` per-row share of ``loss`` (zeros after a fallback).
        damp_percent: dampening actually used, as a fraction of ``mean(diag(H))``; larger than
            requested when the factorization needed retries; None after a fallback.
        fallback: None, or why the weight was quantized by RTN instead.
        refit_rows: with ``config.refit_rounds``, bool ``[N]``: the rows the refit rounds changed
            (``loss`` is the objective of the solve each row was taken from, before its
            refit); else None.
        outliers: with ``outliers`` asked of :func:`gptq_quantize`, the exact corrections of the
            weights extracted during the solve; else None.
        scores: float32 ``[N, K]`` scaled rounding errors ``|w − q| / [H⁻¹]_jj`` of a solve asked
            to keep them (each one's square is its share of ``2 · loss``); else None.
    """

    qweight: QuantizedWeight
    loss: float | None
    row_loss: torch.Tensor
    damp_percent: float | None
    fallback: str | None = None
    refit_rows: torch.Tensor | None = None
    outliers: SparseOutliers | None = None
    scores: torch.Tensor | None = None


class _NotPositiveDefinite(Exception):
    pass


class _NonFinite(Exception):
    pass


def _finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t).all())


def inverse_hessian_factor(
    hessian: torch.Tensor, damp_percent: float, name: str = "<weight>"
) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of ``(H + λI)⁻¹`` with ``λ = damp · mean(diag(H))``.

    When a factorization fails, ``damp`` is multiplied by :data:`DAMP_STEP` (each step logged)
    until :data:`DAMP_CAP`.

    Returns:
        ``(U, damp)``: float32 ``[K, K]`` upper-triangular ``U`` with ``Uᵀ U = (H + λI)⁻¹``, and
        the dampening fraction that worked.
    Raises:
        _NotPositiveDefinite: no dampening up to the cap makes ``H`` positive definite, or
            ``H`` has a non-positive mean diagonal.
    """
    mean_diag = float(hessian.diagonal().mean())
    if not (mean_diag > 0 and mean_diag < float("inf")):
        raise _NotPositiveDefinite(f"mean(diag(H)) = {mean_diag:g}, so no dampening can fix it")
    damp = float(damp_percent)
    while True:
        damped = hessian.clone()
        damped.diagonal().add_(damp * mean_diag)
        factor, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(factor)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0 and _finite(upper):
                return upper, damp
        if damp >= DAMP_CAP:
            raise _NotPositiveDefinite(f"H + λI is not positive definite even at damp_percent={damp:g}")
        nxt = min(damp * DAMP_STEP, DAMP_CAP)
        log.info("%s: Cholesky failed at damp_percent=%g, retrying with %g", name, damp, nxt)
        damp = nxt


def _block_size(config: QuantConfig, dynamic_groups: bool) -> int:
    # With groups fitted during the solve, every group must start at a block start (or lie inside
    # one block) so that its grid sees every earlier error update of its columns.
    gs = config.group_size
    if not dynamic_groups or gs == -1 or BLOCK_SIZE % gs == 0 or gs % BLOCK_SIZE == 0:
        return BLOCK_SIZE
    return gs


@contextmanager
def _one_cpu_thread(device: torch.device):
    """Run on one intra-op CPU thread.

    The column loop is thousands of small tensor operations; OpenMP's fork/join per operation
    costs more than a second thread saves, and stalls badly whenever another core is busy.
    """
    if device.type != "cpu":
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    config: QuantConfig,
    name: str = "<weight>",
    outliers: int = 0,
) -> GPTQResult:
    """Quantize ``weight`` by GPTQ against ``hessian``.

    Args:
        weight: ``[N, K]`` float weight (``nn.Linear`` orientation); not modified.
        hessian: float32 ``[K, K]`` ``2 X Xᵀ / n`` of the layer input (see
            :class:`~bitcliff.statistics.HessianAccumulator`); not modified.
        config: bits, group size, sym, mse, damp_percent, act_order, static_groups,
            refit_rounds.
        name: layer name for log messages and warnings.
        outliers: how many weights to keep exact (SpQR's extraction inside the solve, see
            :func:`_extract_outliers`); 0 for none.
    Returns:
        A :class:`GPTQResult`.  Input channels whose Hessian diagonal is 0 (never active in the
        calibration data) are quantized as 0.  With ``act_order`` columns are processed by
        descending ``diag(H)``; with dynamic groups the groups follow that order and ``g_idx``
        maps each original column to its group, with ``static_groups`` grids are fitted on the
        original contiguous groups before the solve and ``g_idx`` stays contiguous.  A group
        size that does not divide K gives a partial last group.  With ``refit_rounds = r > 0``
        the scales are refitted to the codes (:func:`bitcliff.quant.refit.refit_scales`), and
        ``r − 1`` times more the columns are solved again on that refitted grid and the scales
        refitted to the new codes; every row keeps its best round, so no round raises the layer's
        calibration output error.
    Raises:
        ValueError: non-finite weights or mismatched shapes.
    """
    check_finite(weight, name)
    if weight.dim() != 2 or hessian.shape != (weight.shape[1], weight.shape[1]):
        raise ValueError(
            f"{name}: weight {tuple(weight.shape)} and Hessian {tuple(hessian.shape)} do not match "
            "([N, K] and [K, K] expected)"
        )
    weight, hessian = weight.detach(), hessian.detach()
    with _one_cpu_thread(weight.device), torch.no_grad():
        if not _finite(hessian):
            return _rtn_fallback(weight, config, name, "the Hessian holds NaN/Inf values")
        try:
            problem = _Problem.prepare(weight, hessian, config, name)
            result = _solve(problem, config, grid=None, keep_scores=outliers > 0)
            if outliers > 0:
                return _extract_outliers(weight, hessian, problem, config, result, outliers)
        except _NotPositiveDefinite as exc:
            return _rtn_fallback(weight, config, name, str(exc))
        except _NonFinite:
            return _rtn_fallback(weight, config, name, "the solve produced NaN/Inf values")
        if config.refit_rounds == 0:
            return result
        return _refit_rounds(weight, hessian, problem, config, result)


def _extract_outliers(weight: torch.Tensor, hessian: torch.Tensor, problem: "_Problem", config: QuantConfig,
                      plain: GPTQResult, budget: int) -> GPTQResult:
    """Solve again, keeping exact every weight whose scaled rounding error ``|w − q| / [H⁻¹]_jj``
    (its share of GPTQ's objective) passes the ``budget``-th largest of the plain solve, until
    ``budget`` are kept: their error is not spread over later columns, so the others absorb
    less (SpQR's order, inside the solve; restoring weights after a solve undoes the
    compensation GPTQ gave the weights around them).  With ``refit_rounds`` the scales are
    refitted once to the codes, the kept weights aside; their corrections ``w − dequant(q)`` are
    taken last, so they stay exact up to fp16."""
    scores = plain.scores
    budget = min(budget, scores.numel())
    # the budget-th largest score, a hair lower so that it is taken itself (the scores are
    # compared as |w − q| against threshold · [H⁻¹]_jj, rounded another way)
    threshold = float(torch.topk(scores.flatten(), budget).values[-1]) * (1 - 1e-6)
    result = _solve(problem, config, grid=None, extract=(threshold, budget))
    rows, cols = result.outliers.coordinates()
    qweight, refit_rows = result.qweight, None
    w = weight.float()
    if config.refit_rounds > 0:
        kept = torch.zeros_like(w)
        kept[rows, cols] = w[rows, cols] - qweight.dequantize()[rows, cols]
        qweight, refit_rows = refit_scales(w - kept, hessian, qweight)
    corrections = w[rows, cols] - qweight.dequantize()[rows, cols]
    needed = corrections.half() != 0  # a kept weight the grid now holds exactly costs bits for nothing
    sparse = SparseOutliers.from_entries(rows[needed], cols[needed], corrections[needed], tuple(w.shape))
    return GPTQResult(qweight, result.loss, result.row_loss, result.damp_percent, None, refit_rows, sparse)


def _refit_rounds(
    weight: torch.Tensor, hessian: torch.Tensor, problem: "_Problem", config: QuantConfig, result: GPTQResult
) -> GPTQResult:
    """Refit the scales, then re-solve on the refitted grid and refit again, ``rounds − 1`` times.

    A re-solve is greedy and may land on worse codes for some rows, so after each round every
    row keeps whichever of its previous and new (codes, scales) gives the lower output error:
    rows are independent under GPTQ (one shared ``H``), and the grid's ``g_idx`` is the same in
    every round, so the rows of two rounds can be mixed.
    """
    qweight, refitted = refit_scales(weight, hessian, result.qweight)
    best = dataclasses.replace(result, qweight=qweight)
    if config.refit_rounds == 1:
        best.refit_rows = refitted
        return best
    best_error = row_output_error(weight, qweight.dequantize(), hessian)
    for _ in range(config.refit_rounds - 1):
        # The refitted grid is finite and positive (refit_scales keeps it so): the re-solve
        # on it stays finite.
        new = _solve(problem, config, grid=best.qweight)
        qweight, _ = refit_scales(weight, hessian, new.qweight)
        error = row_output_error(weight, qweight.dequantize(), hessian)
        take = error < best_error
        best = _mix_rows(best, dataclasses.replace(new, qweight=qweight), take)
        best_error = torch.where(take, error, best_error)
        refitted = refitted | take
    best.refit_rows = refitted
    return best


def row_output_error(weight: torch.Tensor, dequantized: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """float32 ``[N]``: each row's ``(w − ŵ) H (w − ŵ)ᵀ``; they sum to :func:`proxy_loss`."""
    delta = weight.float() - dequantized.float()
    return ((delta @ hessian.float()) * delta).sum(dim=1)


def _mix_rows(a: GPTQResult, b: GPTQResult, take_b: torch.Tensor) -> GPTQResult:
    """Rows of ``a``, except where ``take_b`` (bool ``[N]``), which come from ``b``."""
    qa, qb = a.qweight, b.qweight
    mixed = QuantizedWeight(
        codes=torch.where(take_b[None, :], qb.codes, qa.codes),
        scales=torch.where(take_b[None, :], qb.scales, qa.scales),
        zeros=torch.where(take_b[None, :], qb.zeros, qa.zeros),
        g_idx=qa.g_idx,
        bits=qa.bits,
    )
    row_loss = torch.where(take_b, b.row_loss, a.row_loss)
    return GPTQResult(mixed, float(row_loss.sum()), row_loss, a.damp_percent)


@dataclass
class _Problem:
    """One weight ready for the column loop: dead channels zeroed, columns in processing order.

    Attributes:
        wt: float32 ``[K, N]``, the weight transposed (rows contiguous), columns permuted by
            ``perm``; the loop works on a copy.
        hinv: float32 ``[K, K]`` upper Cholesky factor of the damped inverse Hessian, permuted.
        perm: processing order of the original columns (act-order), or None.
        damp: dampening fraction that made the factorization work.
        n_rows, k: the weight's shape.
    """

    wt: torch.Tensor
    hinv: torch.Tensor
    perm: torch.Tensor | None
    damp: float
    n_rows: int
    k: int

    @classmethod
    def prepare(cls, weight: torch.Tensor, hessian: torch.Tensor, config: QuantConfig, name: str) -> "_Problem":
        n_rows, k = weight.shape
        w = weight.detach().float().clone()
        h = hessian.detach().float().clone()
        dead = h.diagonal() == 0
        if bool(dead.any()):
            h[dead, dead] = 1.0
            w[:, dead] = 0.0
        perm = None
        if config.act_order:
            perm = torch.argsort(h.diagonal(), descending=True, stable=True)
            w = w[:, perm]
            h = h[perm][:, perm]
        hinv, damp = inverse_hessian_factor(h, config.damp_percent, name)
        # Work on Wᵀ ([K, N], rows contiguous): every per-column operation then reads and updates
        # contiguous memory, which is what bounds this loop on CPU.
        return cls(w.t().contiguous(), hinv, perm, damp, n_rows, k)


def _solve(problem: _Problem, config: QuantConfig, grid: QuantizedWeight | None,
           extract: tuple[float, int] | None = None, keep_scores: bool = False) -> GPTQResult:
    """One pass of the column loop.

    ``grid``: None to fit grids as configured (when the solve reaches each group, or before it
    with ``static_groups``); or a previous result whose scales, zeros and ``g_idx`` are used
    as they are (a refit round).  ``extract``: ``(threshold, budget)``: keep exact (rounding
    error 0, nothing spread) the weights whose scaled error passes ``threshold``, at most
    ``budget`` of them; the result's ``outliers`` then hold their corrections.  ``keep_scores``:
    the result carries ``scores``.
    """
    n_rows, k, perm = problem.n_rows, problem.k, problem.perm
    wt = problem.wt.clone()
    dev = wt.device
    gs = k if config.group_size == -1 else config.group_size
    original = perm if perm is not None else torch.arange(k, device=dev)
    if grid is not None:
        dynamic = False
        scales, zeros = grid.scales.float().to(dev), grid.zeros.float().to(dev)
        column_group = grid.g_idx.long().to(dev)[original]
    else:
        dynamic = config.group_size != -1 and not config.static_groups
        n_groups = num_groups(k, config.group_size)
        scales = torch.empty(n_groups, n_rows, device=dev)
        zeros = torch.empty(n_groups, n_rows, device=dev)
        if not dynamic:  # grids of the original contiguous groups, fixed before the solve
            w = problem.wt[torch.argsort(perm)].t() if perm is not None else problem.wt.t()
            for g in range(n_groups):
                scales[g], zeros[g] = fit_grid(w[:, g * gs : (g + 1) * gs], config.bits, config.sym, config.mse)
            del w
        # Group of each (processed-order) column: fixed groups follow the original index.
        column_group = (original // gs) if not dynamic else (torch.arange(k, device=dev) // gs)

    hinv = problem.hinv
    maxq = config.maxq
    codes = torch.empty(k, n_rows, device=dev)
    row_loss = torch.zeros(n_rows, device=dev)
    block = _block_size(config, dynamic)
    s = z = None
    scores = torch.empty(k, n_rows, device=dev) if keep_scores else None
    kept_rows, kept_cols, kept_values, taken = [], [], [], 0
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = wt[i1:i2]  # a view: updates land in wt directly
        hinv1 = hinv[i1:i2, i1:i2]
        diag1 = hinv1.diagonal()
        # Row i of Hinv scaled by 1/Hinv[i,i]: the update caused by a unit rounding residual of
        # column i.  Folding the division in here keeps the column loop to a few operations.
        steps = (hinv1 / diag1[:, None]).unbind(0)
        rows = w1.unbind(0)
        if not dynamic:
            cols = column_group[i1:i2]
            col_scales, col_zeros = scales[cols].unbind(0), zeros[cols].unbind(0)
        qs, residuals = [], []
        for i in range(i2 - i1):
            j = i1 + i
            if dynamic:
                if j % gs == 0:
                    g = j // gs
                    scales[g], zeros[g] = fit_grid(wt[j : j + gs].t(), config.bits, config.sym, config.mse)
                    s, z = scales[g], zeros[g]
            else:
                s, z = col_scales[i], col_zeros[i]
            col = rows[i]
            q = quantize_codes(col, s, z, maxq)
            # s * (q - z) is exact in float32 (an fp16 scale times a small integer), so this is
            # the column minus exactly the weight that is stored.
            residual = torch.addcmul(col, s, q - z, value=-1.0)
            if extract is not None and taken < extract[1]:
                over = (residual.abs() > extract[0] * diag1[i]).nonzero().flatten()[: extract[1] - taken]
                if over.numel():  # kept exact: a correction stores the residual (up to fp16)
                    exact = residual[over]
                    residual[over] = exact - exact.half().float()
                    kept_rows.append(over)
                    kept_cols.append(torch.full_like(over, j))
                    kept_values.append(exact)
                    taken += over.numel()
            if i + 1 < i2 - i1:
                w1[i + 1 :].addr_(steps[i][i + 1 :], residual, alpha=-1.0)
            qs.append(q)
            residuals.append(residual)
        codes[i1:i2] = torch.stack(qs)
        err1 = torch.stack(residuals) / diag1[:, None]
        if scores is not None:
            scores[i1:i2] = err1.abs()
        row_loss += err1.square().sum(dim=0) / 2
        wt[i2:].addmm_(hinv[i1:i2, i2:].t(), err1, alpha=-1.0)

    if not (_finite(row_loss) and _finite(codes) and _finite(scales)):
        raise _NonFinite
    if grid is not None:
        g_idx = grid.g_idx.to(dev)
    else:
        g_idx = default_g_idx(k, config.group_size, dev)
        if perm is not None and dynamic:  # groups were formed in processing order
            g_idx = torch.empty(k, dtype=torch.int32, device=dev)
            g_idx[perm] = column_group.to(torch.int32)
    if perm is not None:
        codes = codes[torch.argsort(perm)]
        scores = scores[torch.argsort(perm)] if scores is not None else None
    qweight = QuantizedWeight(
        codes=codes.to(torch.int32),
        scales=scales.half(),
        zeros=zeros.to(torch.int32),
        g_idx=g_idx,
        bits=config.bits,
    )
    outliers = None
    if extract is not None:
        empty = torch.empty(0, dtype=torch.long, device=dev)
        cols = torch.cat(kept_cols) if kept_cols else empty
        outliers = SparseOutliers.from_entries(
            torch.cat(kept_rows) if kept_rows else empty, original[cols],
            torch.cat(kept_values) if kept_values else empty.float(), (n_rows, k))
    return GPTQResult(qweight, float(row_loss.sum()), row_loss, problem.damp, outliers=outliers,
                      scores=scores.t() if scores is not None else None)


def _rtn_fallback(weight: torch.Tensor, config: QuantConfig, name: str, reason: str) -> GPTQResult:
    warnings.warn(
        f"GPTQ could not solve layer {name!r} ({reason}); quantizing it with RTN instead",
        RuntimeWarning,
        stacklevel=4,
    )
    qweight = quantize_rtn(weight, config, name)
    return GPTQResult(qweight, None, torch.zeros(weight.shape[0], device=weight.device), None, fallback=reason)


def split_result(result: GPTQResult, sizes: list[int]) -> list[GPTQResult]:
    """Cut a result for row-stacked weights back into one result per weight (``sizes`` = rows)."""
    if sum(sizes) != result.qweight.codes.shape[1]:
        raise ValueError(f"sizes {sizes} do not add up to {result.qweight.codes.shape[1]} rows")
    parts = []
    qw = result.qweight
    refit = result.refit_rows.split(sizes) if result.refit_rows is not None else [None] * len(sizes)
    for codes, scales, zeros, rows, refit_rows in zip(
        qw.codes.split(sizes, dim=1),
        qw.scales.split(sizes, dim=1),
        qw.zeros.split(sizes, dim=1),
        result.row_loss.split(sizes),
        refit,
    ):
        part = QuantizedWeight(codes.contiguous(), scales.contiguous(), zeros.contiguous(), qw.g_idx.clone(), qw.bits)
        loss = None if result.loss is None else float(rows.sum())
        parts.append(GPTQResult(part, loss, rows.clone(), result.damp_percent, result.fallback,
                                None if refit_rows is None else refit_rows.clone()))
    return parts


def concat_rows(blocks: list[GPTQResult]) -> GPTQResult:
    """The result of a weight from the results of its consecutive row blocks, each solved against
    the same Hessian (the inverse of :func:`split_result`; rows are independent under GPTQ).

    Raises:
        ValueError: blocks that cannot come from one weight (another grid or bit width, or some
            fell back to RTN and others not: solve the whole weight again instead).
    """
    first = blocks[0]
    if any(b.qweight.bits != first.qweight.bits or not torch.equal(b.qweight.g_idx, first.qweight.g_idx)
           for b in blocks):
        raise ValueError("the row blocks use different grids; they are not parts of one weight")
    if len({b.fallback is None for b in blocks}) > 1:
        raise ValueError("some row blocks fell back to RTN and others not")
    refit = None if first.refit_rows is None else torch.cat([b.refit_rows for b in blocks])
    row_loss = torch.cat([b.row_loss for b in blocks])
    qweight = QuantizedWeight(
        codes=torch.cat([b.qweight.codes for b in blocks], dim=1),
        scales=torch.cat([b.qweight.scales for b in blocks], dim=1),
        zeros=torch.cat([b.qweight.zeros for b in blocks], dim=1),
        g_idx=first.qweight.g_idx,
        bits=first.qweight.bits,
    )
    loss = None if first.loss is None else float(row_loss.sum())
    return GPTQResult(qweight, loss, row_loss, first.damp_percent, first.fallback, refit)


def proxy_loss(weight: torch.Tensor, dequantized: torch.Tensor, hessian: torch.Tensor) -> float:
    """``tr((W − Ŵ) H (W − Ŵ)ᵀ)``: with ``H = 2XXᵀ/n`` this is twice the mean squared output error."""
    return float(row_output_error(weight, dequantized, hessian).sum())
