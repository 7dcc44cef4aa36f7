"""The end of every dequant-matmul launch: bias, the stored ``y``, fused capture, split-K.

Both schedules (``gemv.py``, ``tiled.py``) finish an output tile the same way.  With ``SPLIT_K > 1``
several programs computed partial sums of one tile: each adds its partial into an fp32 workspace,
and the *last* one to arrive (an atomic counter tells it) reads the total back, leaves workspace and
counter zeroed for the next launch, and runs the epilogue.  So a launch is one kernel, with no memset
and no second pass, and capture always sees the final ``y``.

The epilogue adds the bias, stores ``y`` and, when capturing, reduces per row: ``stats`` gives
``sum(y**2)`` and ``max|y|`` of the stored ``y``; ``error`` gives ``||y_q - y_fp||**2`` and
``||y_fp||**2`` in fp32, ``y_fp`` accumulated by the schedule from the full-precision weight.  Rows
span several column tiles, so these reductions are fp32 atomics into ``[M]`` buffers.  With
``CAPTURE="none"`` none of this code exists in the compiled kernel.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def epilogue(
    acc, acc_fp, offs_m, offs_n, M, N,
    y_ptr, stride_ym, bias_ptr, cap_a_ptr, cap_b_ptr,
    HAS_BIAS: tl.constexpr, CAPTURE: tl.constexpr,
):
    """Bias, store, and per-row capture reductions of one ``[BM, BN]`` fp32 output tile."""
    mask_m = offs_m < M
    mask_n = offs_n < N
    mask = mask_m[:, None] & mask_n[None, :]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        acc = acc + bias[None, :]
        if CAPTURE == "error":
            acc_fp = acc_fp + bias[None, :]
    y = acc.to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :], y, mask=mask)
    if CAPTURE == "stats":
        # From the stored (rounded) y, so the numbers describe exactly what the next layer sees.
        yf = tl.where(mask, y.to(tl.float32), 0.0)
        tl.atomic_add(cap_a_ptr + offs_m, tl.sum(yf * yf, axis=1), mask=mask_m)
        tl.atomic_max(cap_b_ptr + offs_m, tl.max(tl.abs(yf), axis=1), mask=mask_m)
    if CAPTURE == "error":
        d = tl.where(mask, acc - acc_fp, 0.0)
        f = tl.where(mask, acc_fp, 0.0)
        tl.atomic_add(cap_a_ptr + offs_m, tl.sum(d * d, axis=1), mask=mask_m)
        tl.atomic_add(cap_b_ptr + offs_m, tl.sum(f * f, axis=1), mask=mask_m)


@triton.jit
def finish(
    acc, acc_fp, offs_m, offs_n, tile_id, M, N,
    y_ptr, stride_ym, bias_ptr, cap_a_ptr, cap_b_ptr, ws_ptr, lock_ptr,
    HAS_BIAS: tl.constexpr, CAPTURE: tl.constexpr, SPLIT_K: tl.constexpr,
):
    """:func:`epilogue` directly (``SPLIT_K == 1``) or after the split-K reduction in the workspace."""
    if SPLIT_K == 1:
        epilogue(acc, acc_fp, offs_m, offs_n, M, N, y_ptr, stride_ym, bias_ptr,
                 cap_a_ptr, cap_b_ptr, HAS_BIAS, CAPTURE)
    else:
        mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
        ws_q = ws_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
        ws_fp = ws_q + M * N
        tl.atomic_add(ws_q, acc, mask=mask)
        if CAPTURE == "error":
            tl.atomic_add(ws_fp, acc_fp, mask=mask)
        # Every thread's partial sums are in L2 before the counter moves (acq_rel atomics).
        tl.debug_barrier()
        arrived = tl.atomic_add(lock_ptr + tile_id, 1)
        if arrived == SPLIT_K - 1:
            zero = tl.zeros_like(acc)
            # Read the total with atomics (served by L2, the point of coherence), then leave
            # the workspace and the counter zeroed for the next launch.
            # (Masked-off lanes of an atomic return undefined values: keep them out.)
            acc = tl.where(mask, tl.atomic_add(ws_q, zero, mask=mask), 0.0)
            tl.store(ws_q, zero, mask=mask)
            if CAPTURE == "error":
                acc_fp = tl.where(mask, tl.atomic_add(ws_fp, zero, mask=mask), 0.0)
                tl.store(ws_fp, zero, mask=mask)
            tl.atomic_xchg(lock_ptr + tile_id, 0)
            epilogue(acc, acc_fp, offs_m, offs_n, M, N, y_ptr, stride_ym, bias_ptr,
                     cap_a_ptr, cap_b_ptr, HAS_BIAS, CAPTURE)


@triton.jit
def split_range(n_tiles, SPLIT_K: tl.constexpr):
    """``[start, end)``: the K tiles of this program's slice (``program_id(axis=-1)`` of the grid)."""
    per_split = (n_tiles + SPLIT_K - 1) // SPLIT_K
    start = tl.program_id(2) * per_split
    return start, tl.minimum(start + per_split, n_tiles)
