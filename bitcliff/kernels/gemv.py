"""The decode schedule: one activation row against the packed weight, at the memory limit.

At batch 1 an fp16 matmul is bound by reading the weight; a 2/3/4-bit weight is 4-7x fewer bytes, and
the kernel is as fast as that only if it spends few enough instructions per weight: an H200 reads a
2-bit weight at about 1.6e13 weights/s, which leaves about two thread-instructions per weight
(``bench/sass_model.py`` counts them in the compiled code).  So:

* **Two codes per instruction.**  The weight's plane words are turned into ``half2`` values of
  ``(q - z) / 16`` by the program of ``decode.py`` (``LOP3`` + ``HFMA2`` per two codes, run as
  inline PTX), multiplied with the activation ``half2`` that lies in memory beside them, and summed
  in half precision for sixteen codes before one conversion to fp32.  The scale is applied per
  group in fp32.
* **No shared memory.**  Each thread owns a few columns for the whole K slice; words, scales and
  zeros are loaded as ``[BLOCK_U, BLOCK_N]`` tiles (a thread reads 16 contiguous bytes of a plane
  row), activations as ``[BLOCK_U, 1]`` and broadcast, so nothing is exchanged between threads
  until one reduction after the K loop.
* **Split K** (``SPLIT_K``, ``epilogue.finish``) when the columns alone cannot fill the GPU.

Grid: ``(M, cdiv(N, BLOCK_N), SPLIT_K)``; rows of one tile run as neighbouring programs, so M > 1
re-reads the weight from L2, not DRAM.  ``x`` arrives in the kernel's K order (``qmatmul.py``
gathers it for act-order layouts), so only the ``error`` capture reads through ``kidx``.

With ``FAST=False`` (Triton's interpreter on the CPU, and fp32 activations) the same tile is
computed by plain Triton arithmetic in fp32: it defines the numerics the fast path approximates,
and the fast path's exact bit sequence is tested by executing its program with numpy.
"""

from __future__ import annotations

import triton
import triton.language as tl

from bitcliff.kernels.epilogue import finish, split_range


@triton.jit
def _load(ptr, mask, EVEN: tl.constexpr):
    if EVEN:
        return tl.load(ptr)
    return tl.load(ptr, mask=mask, other=0)


@triton.jit
def _x_quad(ptr, mask, EVEN: tl.constexpr):
    """Four activation pairs ``ptr[0..3]`` (int32 each; 16-byte aligned): one 128-bit broadcast load
    when nothing is masked, else four masked loads."""
    if EVEN:
        return tl.inline_asm_elementwise(
            "ld.global.nc.v4.b32 {$0, $1, $2, $3}, [$4];", "=r,=r,=r,=r,l", [ptr],
            dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=True, pack=1,
        )
    return (tl.load(ptr, mask=mask[0], other=0), tl.load(ptr + 1, mask=mask[1], other=0),
            tl.load(ptr + 2, mask=mask[2], other=0), tl.load(ptr + 3, mask=mask[3], other=0))


@triton.jit
def _unit_fast(
    part, x32_row, lo_ptr, hi_ptr, u, offs_n, mask, c0, c1, c2, c3, c4, K, N,
    DECODE: tl.constexpr, CONSTRAINTS: tl.constexpr,
    LO_WORDS: tl.constexpr, HAS_HI: tl.constexpr, EVEN: tl.constexpr,
):
    """``part + sum (q - z) / 16 * x`` over unit ``u``'s 32 codes of each column: fp32 ``[BLOCK_N]``."""
    w0 = _load(lo_ptr + (u * LO_WORDS) * N + offs_n, mask, EVEN)
    w1 = _load(lo_ptr + (u * LO_WORDS + 1) * N + offs_n, mask, EVEN)
    if LO_WORDS == 4:
        w2 = _load(lo_ptr + (u * LO_WORDS + 2) * N + offs_n, mask, EVEN)
        w3 = _load(lo_ptr + (u * LO_WORDS + 3) * N + offs_n, mask, EVEN)
    else:
        w2 = w0
        w3 = w0
    if HAS_HI:
        h = _load(hi_ptr + u * N + offs_n, mask, EVEN)
    else:
        h = w0
    # The unit's sixteen activation pairs (x[2p], x[2p+1]) as int32, p = 16u + j: one address
    # for every thread (broadcast loads); zero past K (K is even).
    p = u * 16
    x0, x1, x2, x3 = _x_quad(x32_row + p, (2 * p < K, 2 * p + 2 < K, 2 * p + 4 < K, 2 * p + 6 < K), EVEN)
    x4, x5, x6, x7 = _x_quad(x32_row + p + 4, (2 * p + 8 < K, 2 * p + 10 < K, 2 * p + 12 < K,
                                               2 * p + 14 < K), EVEN)
    x8, x9, x10, x11 = _x_quad(x32_row + p + 8, (2 * p + 16 < K, 2 * p + 18 < K, 2 * p + 20 < K,
                                                 2 * p + 22 < K), EVEN)
    x12, x13, x14, x15 = _x_quad(x32_row + p + 12, (2 * p + 24 < K, 2 * p + 26 < K, 2 * p + 28 < K,
                                                    2 * p + 30 < K), EVEN)
    return tl.inline_asm_elementwise(
        DECODE, CONSTRAINTS,
        [part, w0, w1, w2, w3, h, x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14,
         x15, c0, c1, c2, c3, c4],
        dtype=tl.float32, is_pure=True, pack=1,
    )


@triton.jit
def _zero_constants(zero, ZERO_CONSTANTS: tl.constexpr):
    """The decode program's five zero-point operands: one integer multiply-add each."""
    return tl.inline_asm_elementwise(
        ZERO_CONSTANTS, "=r,=r,=r,=r,=r,r", [zero.to(tl.int32)],
        dtype=(tl.int32, tl.int32, tl.int32, tl.int32, tl.int32), is_pure=True, pack=1,
    )


@triton.jit
def _plane_codes(plane_ptr, u, kin, n2, mask2, N, WIDTH: tl.constexpr):
    """The ``WIDTH``-bit fields of codes ``kin`` of unit ``u`` in one plane: plane word
    ``kin // PER`` of the unit, bit ``16 (kin % 2) + WIDTH (kin % PER // 2)`` (layout.code_bit)."""
    PER: tl.constexpr = 32 // WIDTH
    word = tl.load(plane_ptr + (u * WIDTH + kin // PER) * N + n2, mask=mask2, other=0)
    return (word >> (16 * (kin % 2) + WIDTH * (kin % PER // 2))) & ((1 << WIDTH) - 1)


@triton.jit
def _unit_portable(
    part, x_row, lo_ptr, hi_ptr, u, offs_n, mask, zero, K, N, LO: tl.constexpr, HI: tl.constexpr,
):
    """``part + sum (q - z) * x`` over unit ``u``'s 32 codes of each column, in fp32."""
    kin = tl.arange(0, 32)[:, None]
    n2 = offs_n[None, :]
    mask2 = mask[None, :]
    q = _plane_codes(lo_ptr, u, kin, n2, mask2, N, LO)
    if HI > 0:
        q = q | (_plane_codes(hi_ptr, u, kin, n2, mask2, N, HI) << LO)
    k = u * 32 + kin
    xv = tl.load(x_row + k, mask=k < K, other=0.0).to(tl.float32)
    w = q.to(tl.float32) - zero.to(tl.float32)[None, :]
    return part + tl.sum(w * xv, axis=0)


@triton.jit
def qmm_gemv_kernel(
    # pointers
    x_ptr,  # [M, K] activations (fp16/bf16/fp32) in kernel K order, unit stride along K
    lo_ptr, hi_ptr,  # int32 bit planes [KP*LO/32, N], [KP*HI/32, N] (hi: widths with two planes)
    scales_ptr, zeros_ptr,  # [G, N] scales (any float), uint8 zeros
    kidx_ptr,  # int32 [KP]: activation column of each kernel K position (PERMUTED error capture)
    bias_ptr,  # [N] (HAS_BIAS only)
    wfp_ptr,  # [N, K] full-precision weight (CAPTURE == "error" only)
    y_ptr,  # [M, N] output, x's dtype
    cap_a_ptr, cap_b_ptr,  # fp32 [M] capture outputs, zero-initialized
    ws_ptr, lock_ptr,  # fp32 split-K workspace and int32 tile counters, zero at rest
    # sizes
    M, N, K, KP,  # K: valid activation columns of x (in kernel order)
    M_BUCKET,  # autotuning key only
    # strides, in elements
    stride_xm, stride_wfp, stride_ym,
    # what to compute
    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, CAPTURE: tl.constexpr,
    LO: tl.constexpr, HI: tl.constexpr,  # bit planes of the width (layout.width): low, high (0: none)
    HAS_BIAS: tl.constexpr, PERMUTED: tl.constexpr, INTERPRET: tl.constexpr,
    FAST: tl.constexpr,  # the decode program (fp16/bf16 activations, compiled)
    EVEN: tl.constexpr,  # whole tiles of units, N % BLOCK_N == 0 and K == KP: no masks in the loop
    DECODE: tl.constexpr, ZERO_CONSTANTS: tl.constexpr, CONSTRAINTS: tl.constexpr,
    # how (tuned)
    BLOCK_N: tl.constexpr, BLOCK_U: tl.constexpr, SPLIT_K: tl.constexpr,
):
    LO_WORDS: tl.constexpr = LO  # low-plane words per 32-code unit
    HAS_HI: tl.constexpr = HI > 0
    tl.static_assert(HI <= 1, "the gemv decodes a high plane of one bit")
    BLOCK_K: tl.constexpr = 32 * BLOCK_U
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    n_units = KP // 32
    t_start, t_end = split_range(tl.cdiv(n_units, BLOCK_U), SPLIT_K)
    x_row = x_ptr + pid_m.to(tl.int64) * stride_xm
    x32_row = x_row.to(tl.pointer_type(tl.int32), bitcast=True)  # pairs; the launcher aligns x

    # Scale and zero change once per tile when a tile lies in one group (the usual case), else
    # once per unit.
    ONE_GROUP: tl.constexpr = GROUP_SIZE == -1 or GROUP_SIZE % BLOCK_K == 0
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc_fp = tl.zeros([BLOCK_N], dtype=tl.float32)
    for t in range(t_start, t_end):
        if ONE_GROUP:
            g = 0 if GROUP_SIZE == -1 else (t * BLOCK_K) // GROUP_SIZE
            scale = _load(scales_ptr + g * N + offs_n, mask_n, EVEN).to(tl.float32)
            zero = _load(zeros_ptr + g * N + offs_n, mask_n, EVEN)
            if FAST:
                c0, c1, c2, c3, c4 = _zero_constants(zero, ZERO_CONSTANTS)
        part = tl.zeros([BLOCK_N], dtype=tl.float32)
        for i in tl.static_range(BLOCK_U):
            u = t * BLOCK_U + i
            mask = mask_n if EVEN else mask_n & (tl.zeros_like(offs_n) + u < n_units)
            if not ONE_GROUP:
                g = (u * 32) // GROUP_SIZE
                scale = _load(scales_ptr + g * N + offs_n, mask, EVEN).to(tl.float32)
                zero = _load(zeros_ptr + g * N + offs_n, mask, EVEN)
                if FAST:
                    c0, c1, c2, c3, c4 = _zero_constants(zero, ZERO_CONSTANTS)
            if FAST:
                part = _unit_fast(part, x32_row, lo_ptr, hi_ptr, u, offs_n, mask, c0, c1, c2, c3, c4,
                                  K, N, DECODE, CONSTRAINTS, LO_WORDS, HAS_HI, EVEN)
            else:
                part = _unit_portable(part, x_row, lo_ptr, hi_ptr, u, offs_n, mask, zero, K, N, LO, HI)
            if not ONE_GROUP:
                acc += part * (scale * 16.0 if FAST else scale)
                part = tl.zeros([BLOCK_N], dtype=tl.float32)
        if ONE_GROUP:
            acc += part * (scale * 16.0 if FAST else scale)  # the fast program computes (q - z) / 16
        if CAPTURE == "error":
            # The fp weight row segment, read along K (its contiguous dim) beside the codes.
            kk = t * BLOCK_K + tl.arange(0, BLOCK_K)
            if PERMUTED:
                src_k = tl.load(kidx_ptr + kk, mask=kk < KP, other=-1)
                valid = src_k >= 0
            else:
                src_k = kk
                valid = kk < K
            xk = tl.load(x_row + kk, mask=kk < K, other=0.0).to(tl.float32)
            wf = tl.load(
                wfp_ptr + offs_n.to(tl.int64)[:, None] * stride_wfp + src_k[None, :],
                mask=mask_n[:, None] & valid[None, :], other=0.0,
            ).to(tl.float32)
            acc_fp += tl.sum(wf * xk[None, :], axis=1)

    offs_m = pid_m + tl.arange(0, 1)
    tile_id = pid_m * tl.num_programs(1) + pid_n
    finish(acc[None, :], acc_fp[None, :], offs_m, offs_n, tile_id, M, N,
           y_ptr, stride_ym, bias_ptr, cap_a_ptr, cap_b_ptr, ws_ptr, lock_ptr,
           HAS_BIAS, CAPTURE, SPLIT_K)
