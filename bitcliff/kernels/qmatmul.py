"""Triton dequant-matmul for 2/3/4-bit group-quantized weights, with fused error capture.

Computes ``y = x @ dequant(W)ᵀ (+ bias)`` for fp16/bf16 activations ``x [M, K]`` and a weight in
the kernel layout of ``layout.py`` (bit planes along K, uint8 zeros, contiguous 32-aligned groups).
``kernels/reference.py`` defines the result; this file only makes it fast.

One source serves every bit width: ``BITS``, ``GROUP_SIZE`` and ``CAPTURE`` are ``tl.constexpr``
and all unpacking goes through :func:`_unpack`.  Two schedules, chosen by M:

* ``gemv`` (decode, ``M <= GEMV_MAX_M``): one program per (row, BLOCK_N columns, K slice), one
  column per thread.  Each packed word is loaded once (a warp reads 128 contiguous bytes of a
  plane row) and expanded in registers to the PER codes it holds; partial sums stay per
  (unit, position, column) in registers and are reduced once after the K loop, so the loop has
  no shared memory, no barriers and no tensor cores (a GEMV has nothing for them to do).  Codes
  become floats by the 2**23 mantissa trick rather than int->float conversions (a quarter-rate
  unit on Hopper); ``code - zero`` is exact in fp32 and the scale is applied once per K tile.
  Rows of one tile run as neighbouring programs, so M > 1 re-reads the weight from L2, not DRAM.
* ``tiled`` (prefill, larger M): the matmul tutorial's grouped tile order; each K step unpacks a
  ``[BLOCK_K, BLOCK_N]`` weight tile to the activation dtype and feeds ``tl.dot``.

Both split K when the output has too few tiles to fill the GPU (``SPLIT_K`` > 1): partial tiles are
added into an fp32 workspace and the *last* program of a tile (an atomic counter tells it) reads the
sum back, leaves the workspace and counter zeroed for the next launch, and runs the epilogue.  So a
launch is one kernel, with no memset and no second pass, and capture always sees the final ``y``.

The epilogue (:func:`_epilogue`) adds the bias, stores ``y`` and, when capturing, reduces per row:
``stats`` gives ``sum(y**2)`` and ``max|y|`` of the stored ``y``; ``error`` gives
``||y_q - y_fp||**2`` and ``||y_fp||**2`` in fp32, where ``y_fp`` was accumulated in the same K loop
from the full-precision weight tile loaded beside the packed one (never written to memory).  Rows
span several column tiles, so these reductions are fp32 atomics into ``[M]`` buffers.  With
``CAPTURE="none"`` none of this code exists in the compiled kernel.

Tuning: ``triton.autotune`` over block shapes and ``SPLIT_K`` (keys: M bucket, N, K, and the
constexprs; candidate lists and pruning in ``tuning.py``), and the winner per device, Triton version
and shape class is kept in a JSON file under ``$BITCLIFF_CACHE`` (default ``~/.cache/bitcliff``) so
later runs launch it directly.  Under
``TRITON_INTERPRET=1`` (CPU tests) a fixed small configuration is used and nothing is tuned.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from bitcliff.kernels.layout import KernelLayout
from bitcliff.kernels.reference import CaptureMode
from bitcliff.kernels.tuning import (
    DEFAULT_CONFIGS,
    GEMV_MAX_M,
    SPLIT_MAX_M,
    TUNING_CACHE,
    config_dict,
    gemv_configs,
    m_bucket,
    prune_gemv,
    prune_tiled,
    tiled_configs,
)

SCHEDULES = ("auto", "gemv", "tiled")
_MAGIC = tl.constexpr(8388608.0)  # 2**23: a code OR-ed into its mantissa reads as 2**23 + code

# ---------------------------------------------------------------------------------------------
# Shared device helpers
# ---------------------------------------------------------------------------------------------


@triton.jit
def _unpack(lo, hi, kin, BITS: tl.constexpr):
    """Integer codes at position ``kin`` (0..31) of their 32-code unit.

    ``lo``: the low-plane word holding that position (word ``k // PER`` of the plane);
    ``hi``: the unit's high-plane word (3-bit only, ignored otherwise).  ``kin`` is either a
    compile-time int (gemv) or a tensor broadcastable against the words (tiled).  Shifts are
    arithmetic on int32, so every field is masked after shifting.
    """
    LO: tl.constexpr = 2 if BITS == 3 else BITS
    PER: tl.constexpr = 32 // LO
    q = (lo >> ((kin % PER) * LO)) & ((1 << LO) - 1)
    if BITS == 3:
        q = q | (((hi >> kin) & 1) << 2)
    return q


@triton.jit
def _mma(a, b, acc, INTERPRET: tl.constexpr):
    if INTERPRET or a.dtype == tl.float32:
        # The interpreter's dot has no bfloat16 (numpy); fp32 upcasts give the same exact
        # products.  fp32 activations also take this path so they are not rounded to tf32.
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _epilogue(
    acc, acc_fp, offs_m, offs_n, M, N,
    y_ptr, stride_ym, bias_ptr, cap_a_ptr, cap_b_ptr,
    HAS_BIAS: tl.constexpr, CAPTURE: tl.constexpr,
):
    """Bias, store, and per-row capture reductions of one ``[BM, BN]`` output tile."""
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
def _finish(
    acc, acc_fp, offs_m, offs_n, tile_id, M, N,
    y_ptr, stride_ym, bias_ptr, cap_a_ptr, cap_b_ptr, ws_ptr, lock_ptr,
    HAS_BIAS: tl.constexpr, CAPTURE: tl.constexpr, SPLIT_K: tl.constexpr,
):
    """Epilogue directly (``SPLIT_K == 1``) or after the split-K reduction in the workspace."""
    if SPLIT_K == 1:
        _epilogue(acc, acc_fp, offs_m, offs_n, M, N, y_ptr, stride_ym, bias_ptr,
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
            _epilogue(acc, acc_fp, offs_m, offs_n, M, N, y_ptr, stride_ym, bias_ptr,
                      cap_a_ptr, cap_b_ptr, HAS_BIAS, CAPTURE)


# ---------------------------------------------------------------------------------------------
# Schedule 1: GEMV / split-K for decode
# ---------------------------------------------------------------------------------------------


@triton.jit
def _qmm_gemv_kernel(
    # pointers
    x_ptr,  # [M, K] activations (fp16/bf16/fp32), unit stride along K
    lo_ptr, hi_ptr,  # int32 bit planes [KP*LO/32, N], [KP/32, N] (hi: 3-bit only)
    scales_ptr, zeros_ptr,  # [G, N] scales (any float), uint8 zeros
    kidx_ptr,  # int32 [KP]: activation column of each kernel K position (PERMUTED only)
    bias_ptr,  # [N] (HAS_BIAS only)
    wfp_ptr,  # [N, K] full-precision weight (CAPTURE == "error" only)
    y_ptr,  # [M, N] output, x's dtype
    cap_a_ptr, cap_b_ptr,  # fp32 [M] capture outputs, zero-initialized
    ws_ptr, lock_ptr,  # fp32 split-K workspace and int32 tile counters, zero at rest
    # sizes
    M, N, K, KP,
    M_BUCKET,  # autotuning key only
    # strides, in elements
    stride_xm, stride_wfp, stride_ym,
    # what to compute
    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, CAPTURE: tl.constexpr,
    HAS_BIAS: tl.constexpr, PERMUTED: tl.constexpr, INTERPRET: tl.constexpr,
    # how (tuned)
    BLOCK_N: tl.constexpr, BLOCK_U: tl.constexpr, SPLIT_K: tl.constexpr,
):
    LO: tl.constexpr = 2 if BITS == 3 else BITS
    PER: tl.constexpr = 32 // LO
    BLOCK_K: tl.constexpr = 32 * BLOCK_U
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_u = tl.arange(0, BLOCK_U)
    n_units = KP // 32
    n_tiles = tl.cdiv(n_units, BLOCK_U)
    per_split = tl.cdiv(n_tiles, SPLIT_K)
    t_start = pid_k * per_split
    t_end = tl.minimum(t_start + per_split, n_tiles)
    x_row = x_ptr + pid_m.to(tl.int64) * stride_xm

    # acc[u, j, n]: column n's sum over the codes at position j of the words of K tile row u.
    # Reduced over (u, j) once, after the K loop, so the loop body is elementwise only.
    acc = tl.zeros([BLOCK_U, PER, BLOCK_N], dtype=tl.float32)
    acc_fp = tl.zeros([BLOCK_N], dtype=tl.float32)
    offs_j = tl.arange(0, PER)
    for t in range(t_start, t_end):
        u = t * BLOCK_U + offs_u
        mask_w = (u < n_units)[:, None] & mask_n[None, :]
        # Scale and zero of each (unit, column): one row when the tile lies in one group.
        # Words, scales and zeros are all loaded as [BLOCK_U, 1, BLOCK_N] tensors so that they
        # land in the layout of the [BLOCK_U, PER, BLOCK_N] codes they combine with (a mismatch
        # costs a shuffle through shared memory and two barriers per tile).  Within one group the
        # BLOCK_U scale rows repeat one address: L1 hits.
        u3 = u[:, None, None]
        n3 = offs_n[None, None, :]
        mask_w3 = mask_w[:, None, :]
        if GROUP_SIZE == -1:
            g_off = n3 + 0 * u3
        elif GROUP_SIZE % BLOCK_K == 0:
            g_off = ((t * BLOCK_K) // GROUP_SIZE) * N + n3 + 0 * u3
        else:
            g_off = ((u3 * 32) // GROUP_SIZE) * N + n3
        scale = tl.load(scales_ptr + g_off, mask=mask_w3, other=0.0).to(tl.float32)
        zero_magic = tl.load(zeros_ptr + g_off, mask=mask_w3, other=0).to(tl.float32) + _MAGIC
        if BITS == 3:
            hi = tl.load(hi_ptr + u3 * N + n3, mask=mask_w3, other=0)
        else:
            hi = 0
        part = tl.zeros([BLOCK_U, PER, BLOCK_N], dtype=tl.float32)
        for w in tl.static_range(LO):
            # Plane word w of each unit holds the codes at unit positions w*PER .. w*PER+PER-1.
            lo = tl.load(lo_ptr + (u3 * LO + w) * N + n3, mask=mask_w3, other=0)
            kin = w * PER + offs_j
            k = u[:, None] * 32 + kin[None, :]
            if PERMUTED:
                src = tl.load(kidx_ptr + k, mask=(u < n_units)[:, None], other=-1)
                xv = tl.load(x_row + src, mask=src >= 0, other=0.0).to(tl.float32)
            else:
                xv = tl.load(x_row + k, mask=k < K, other=0.0).to(tl.float32)
            q = _unpack(lo, hi, kin[None, :, None], BITS)
            # float(q) - zero, exactly: OR the code into the mantissa of 2**23 and subtract
            # 2**23 + zero (one LOP3 and one FADD; no int->float conversion unit).
            qf = (q | 0x4B000000).to(tl.float32, bitcast=True) - zero_magic
            part += qf * xv[:, :, None]
        acc += part * scale
        if CAPTURE == "error":
            # The fp weight row segment, read along K (its contiguous dim) beside the codes.
            kk = t * BLOCK_K + tl.arange(0, BLOCK_K)
            if PERMUTED:
                src_k = tl.load(kidx_ptr + kk, mask=kk < KP, other=-1)
                valid = src_k >= 0
            else:
                src_k = kk
                valid = kk < K
            xk = tl.load(x_row + src_k, mask=valid, other=0.0).to(tl.float32)
            wf = tl.load(
                wfp_ptr + offs_n.to(tl.int64)[:, None] * stride_wfp + src_k[None, :],
                mask=mask_n[:, None] & valid[None, :], other=0.0,
            ).to(tl.float32)
            acc_fp += tl.sum(wf * xk[None, :], axis=1)

    acc_n = tl.sum(tl.sum(acc, axis=1), axis=0)
    offs_m = pid_m + tl.arange(0, 1)
    tile_id = pid_m * tl.num_programs(1) + pid_n
    _finish(acc_n[None, :], acc_fp[None, :], offs_m, offs_n, tile_id, M, N,
            y_ptr, stride_ym, bias_ptr, cap_a_ptr, cap_b_ptr, ws_ptr, lock_ptr,
            HAS_BIAS, CAPTURE, SPLIT_K)


# ---------------------------------------------------------------------------------------------
# Schedule 2: tiled tl.dot for prefill
# ---------------------------------------------------------------------------------------------


@triton.jit
def _qmm_tiled_kernel(
    # pointers (as in _qmm_gemv_kernel)
    x_ptr, lo_ptr, hi_ptr, scales_ptr, zeros_ptr, kidx_ptr, bias_ptr, wfp_ptr,
    y_ptr, cap_a_ptr, cap_b_ptr, ws_ptr, lock_ptr,
    # sizes
    M, N, K, KP,
    M_BUCKET,  # autotuning key only
    # strides, in elements
    stride_xm, stride_wfp, stride_ym,
    # what to compute
    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, CAPTURE: tl.constexpr,
    HAS_BIAS: tl.constexpr, PERMUTED: tl.constexpr, INTERPRET: tl.constexpr,
    # how (tuned)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    LO: tl.constexpr = 2 if BITS == 3 else BITS
    PER: tl.constexpr = 32 // LO
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    # Grouped ordering: GROUP_M row tiles sweep the column tiles together, so the weight tiles
    # they share stay in L2.
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm

    n_tiles = tl.cdiv(KP, BLOCK_K)
    per_split = tl.cdiv(n_tiles, SPLIT_K)
    t_start = pid_k * per_split
    t_end = tl.minimum(t_start + per_split, n_tiles)

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_fp = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for t in range(t_start, t_end):
        offs_k = t * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_k = offs_k < KP
        if PERMUTED:
            src = tl.load(kidx_ptr + offs_k, mask=mask_k, other=-1)
            valid = src >= 0
        else:
            src = offs_k
            valid = offs_k < K
        a = tl.load(x_rows + src[None, :], mask=mask_m[:, None] & valid[None, :], other=0.0)

        mask_w = mask_k[:, None] & mask_n[None, :]
        # Load each plane word once ([BLOCK_K / PER, BLOCK_N], what the pipeliner stages in
        # shared memory) and replicate it in registers to the PER codes it holds.
        rows = t * (BLOCK_K // PER) + tl.arange(0, BLOCK_K // PER)
        lo = tl.load(lo_ptr + rows[:, None] * N + offs_n[None, :],
                     mask=(rows < KP // PER)[:, None] & mask_n[None, :], other=0)
        lo = tl.reshape(tl.broadcast_to(lo[:, None, :], (BLOCK_K // PER, PER, BLOCK_N)), (BLOCK_K, BLOCK_N))
        if BITS == 3:
            rows_hi = t * (BLOCK_K // 32) + tl.arange(0, BLOCK_K // 32)
            hi = tl.load(hi_ptr + rows_hi[:, None] * N + offs_n[None, :],
                         mask=(rows_hi < KP // 32)[:, None] & mask_n[None, :], other=0)
            hi = tl.reshape(tl.broadcast_to(hi[:, None, :], (BLOCK_K // 32, 32, BLOCK_N)), (BLOCK_K, BLOCK_N))
        else:
            hi = lo
        q = _unpack(lo, hi, (offs_k % 32)[:, None], BITS)

        if GROUP_SIZE == -1:
            g_off = offs_n[None, :]
            g_mask = mask_n[None, :]
        elif GROUP_SIZE % BLOCK_K == 0:
            g_off = ((t * BLOCK_K) // GROUP_SIZE) * N + offs_n[None, :]
            g_mask = mask_n[None, :]
        else:
            g_off = (offs_k // GROUP_SIZE)[:, None] * N + offs_n[None, :]
            g_mask = mask_w
        scale = tl.load(scales_ptr + g_off, mask=g_mask, other=0.0).to(tl.float32)
        zero_magic = tl.load(zeros_ptr + g_off, mask=g_mask, other=0).to(tl.float32) + _MAGIC
        # One rounding, to the activation dtype, of the exact fp32 value scale * (q - zero).
        qf = (q | 0x4B000000).to(tl.float32, bitcast=True) - zero_magic  # exact float(q) - zero
        w = (qf * scale).to(a.dtype)
        acc = _mma(a, w, acc, INTERPRET)
        if CAPTURE == "error":
            wf = tl.load(
                wfp_ptr + offs_n.to(tl.int64)[None, :] * stride_wfp + src[:, None],
                mask=valid[:, None] & mask_n[None, :], other=0.0,
            ).to(a.dtype)
            acc_fp = _mma(a, wf, acc_fp, INTERPRET)

    tile_id = pid_m * num_pid_n + pid_n
    _finish(acc, acc_fp, offs_m, offs_n, tile_id, M, N,
            y_ptr, stride_ym, bias_ptr, cap_a_ptr, cap_b_ptr, ws_ptr, lock_ptr,
            HAS_BIAS, CAPTURE, SPLIT_K)


# ---------------------------------------------------------------------------------------------
# Configurations and tuning
# ---------------------------------------------------------------------------------------------

INTERPRETED = not isinstance(_qmm_gemv_kernel, triton.runtime.JITFunction)
KEY = ["M_BUCKET", "N", "K", "BITS", "GROUP_SIZE", "CAPTURE", "HAS_BIAS", "PERMUTED"]

_gemv_tuned = triton.autotune(
    configs=gemv_configs(), key=KEY, reset_to_zero=["cap_a_ptr", "cap_b_ptr"],
    prune_configs_by={"early_config_prune": prune_gemv},
)(_qmm_gemv_kernel)
_tiled_tuned = triton.autotune(
    configs=tiled_configs(), key=KEY, reset_to_zero=["cap_a_ptr", "cap_b_ptr"],
    prune_configs_by={"early_config_prune": prune_tiled},
)(_qmm_tiled_kernel)

_KERNELS = {"gemv": (_qmm_gemv_kernel, _gemv_tuned), "tiled": (_qmm_tiled_kernel, _tiled_tuned)}


# ---------------------------------------------------------------------------------------------
# Split-K workspace: persistent per (device, stream), zero at rest (the kernels re-zero it)
# ---------------------------------------------------------------------------------------------

_WORKSPACES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


_DUMMIES: dict[str, torch.Tensor] = {}


def _dummy(device: torch.device) -> torch.Tensor:
    """One fp32 element per device for pointer arguments a variant does not use (no per-call alloc)."""
    key = str(device)
    if key not in _DUMMIES:
        _DUMMIES[key] = torch.zeros(1, dtype=torch.float32, device=device)
    return _DUMMIES[key]


def _workspace(device: torch.device, floats: int, counters: int) -> tuple[torch.Tensor, torch.Tensor]:
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        key = ("cuda", index, torch.cuda.current_stream(index).cuda_stream)
    else:
        key = (device.type, -1, 0)
    ws, lock = _WORKSPACES.get(key, (None, None))
    if ws is None or ws.numel() < floats or lock.numel() < counters:
        ws = torch.zeros(max(floats, 0 if ws is None else ws.numel(), 1), dtype=torch.float32, device=device)
        lock = torch.zeros(max(counters, 0 if lock is None else lock.numel(), 1), dtype=torch.int32, device=device)
        _WORKSPACES[key] = (ws, lock)
    return ws, lock


# ---------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------


def choose_schedule(m: int) -> str:
    """``gemv`` for decode-sized batches, ``tiled`` otherwise."""
    return "gemv" if m <= GEMV_MAX_M else "tiled"


def quant_matmul(
    x: torch.Tensor,
    layout: KernelLayout,
    bias: torch.Tensor | None = None,
    *,
    capture: CaptureMode | str = CaptureMode.NONE,
    weight_fp: torch.Tensor | None = None,
    schedule: str = "auto",
    config: dict | None = None,
    out: torch.Tensor | None = None,
):
    """``y = x @ dequant(W)ᵀ (+ bias)`` with optional per-token capture.

    Args:
        x: ``[..., K]`` fp16/bf16 (fp32 accepted, computed without tf32), K = ``layout.in_features``.
        layout: the weight in kernel layout (:func:`bitcliff.kernels.layout.from_gptq`), same device.
        bias: optional ``[N]``, any float dtype.
        capture: a :class:`~bitcliff.kernels.reference.CaptureMode` or its name.
        weight_fp: ``[N, K]`` full-precision weight, required for ``"error"``.
        schedule: ``"auto"`` (by M), ``"gemv"`` or ``"tiled"``.
        config: meta-parameters to launch with instead of tuning (tests, benchmarks).
        out: optional preallocated ``[M, N]`` output (contiguous, x's dtype).
    Returns:
        ``y`` ``[..., N]`` in x's dtype; with capture, ``(y, a, b)`` where a, b are fp32 ``[M]``
        (M = tokens = ``x.numel() // K``): ``stats``: ``sum(y**2)``, ``max|y|`` per token;
        ``error``: ``||y_q - y_fp||**2``, ``||y_fp||**2`` per token (fp32 accumulators, bias in both).
    """
    capture = CaptureMode.parse(capture).value  # a plain string from here on: it is a constexpr
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    k, n = layout.in_features, layout.out_features
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features, the weight expects {k}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"x must be fp16, bf16 or fp32, got {x.dtype}")
    device = x.device
    if device.type != "cuda" and not INTERPRETED:
        raise ValueError("the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 on CPU)")
    if layout.device != device:
        raise ValueError(f"layout is on {layout.device}, x on {device}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if out is None:
        y = torch.empty(m, n, dtype=x.dtype, device=device)
    else:
        if out.shape != (m, n) or out.dtype != x.dtype or not out.is_contiguous():
            raise ValueError(f"out must be a contiguous {x.dtype} [{m}, {n}] tensor")
        y = out
    if capture == "error":
        if weight_fp is None or tuple(weight_fp.shape) != (n, k):
            raise ValueError(f"capture='error' needs weight_fp of shape [{n}, {k}]")
        if weight_fp.device != device:
            raise ValueError(f"weight_fp is on {weight_fp.device}, x on {device}")
        wfp = weight_fp if weight_fp.stride(-1) == 1 else weight_fp.contiguous()
    else:
        wfp = x2
    if m == 0:
        empty = torch.zeros(0, dtype=torch.float32, device=device)
        y = y.reshape(*lead, n)
        return y if capture == "none" else (y, empty, empty.clone())
    if capture == "none":
        cap_a = cap_b = _dummy(device)  # never touched: CAPTURE="none" compiles the stores out
    else:
        cap_a = torch.zeros(m, dtype=torch.float32, device=device)
        cap_b = torch.zeros(m, dtype=torch.float32, device=device)

    if schedule == "auto":
        schedule = choose_schedule(m)
    raw, tuned = _KERNELS[schedule]
    key = None
    if config is None and not INTERPRETED:
        key = "|".join(str(v) for v in (
            schedule, layout.bits, layout.group_size, str(x.dtype).removeprefix("torch."), capture,
            f"m{m_bucket(m)}", f"n{n}", f"k{layout.k_padded}", int(bias is not None),
            int(layout.kidx is not None),
        ))
        config = TUNING_CACHE.get(device, key)
    if config is not None or INTERPRETED:
        config = dict(DEFAULT_CONFIGS[schedule], **(config or {}))
        may_split = config["SPLIT_K"] > 1
    else:
        may_split = m <= SPLIT_MAX_M  # tuning may pick a split
    # Counters for the smallest tiles any configuration uses (16 rows/columns).
    counters = (m if schedule == "gemv" else triton.cdiv(m, 16)) * triton.cdiv(n, 16)
    floats = (2 if capture == "error" else 1) * m * n
    ws, lock = _workspace(device, floats if may_split else 1, counters if may_split else 1)

    args = (
        x2, layout.lo, layout.hi if layout.hi is not None else layout.lo,
        layout.scales, layout.zeros,
        layout.kidx if layout.kidx is not None else lock,
        bias if bias is not None else cap_a, wfp,
        y, cap_a, cap_b, ws, lock,
        m, n, k, layout.k_padded, m_bucket(m),
        x2.stride(0), wfp.stride(0), y.stride(0),
    )
    meta = dict(
        BITS=layout.bits, GROUP_SIZE=layout.group_size, CAPTURE=capture,
        HAS_BIAS=bias is not None, PERMUTED=layout.kidx is not None, INTERPRET=INTERPRETED,
    )
    if config is None:
        tuned[_grid(schedule, m, n)](*args, **meta)
        TUNING_CACHE.put(device, key, config_dict(tuned.best_config))
    else:
        raw[_grid(schedule, m, n)](*args, **meta, **config)
    return _result(y, cap_a, cap_b, lead, n, capture)


def _grid(schedule: str, m: int, n: int):
    if schedule == "gemv":
        return lambda meta: (m, triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"])
    return lambda meta: (
        triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"]
    )


def _result(y, cap_a, cap_b, lead, n, capture):
    y = y.reshape(*lead, n)
    return y if capture == "none" else (y, cap_a, cap_b)
