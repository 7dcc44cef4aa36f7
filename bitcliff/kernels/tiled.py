"""The prefill schedule: tiles of activation rows against dequantized weight tiles on tensor cores.

The matmul tutorial's grouped tile order.  Each K step loads the packed plane tile once (what the
pipeliner stages in shared memory) as ``[BLOCK_N, words]`` and turns every word into its codes'
weights ``s * (q - z)`` in the activation dtype with the word program of ``decode.py`` (two codes
per ``LOP3`` + ``HFMA2``, the scale by one more ``HFMA2``; exactly the reference's one rounding),
then lays them out K-contiguous per column, ``[BLOCK_N, BLOCK_K]``, and feeds ``tl.dot`` with its
transpose (a K-major operand: each thread's eight neighbouring weights go to shared memory in one
16-byte store).  A K tile lies inside one quantization group, so scales and zero constants are
loaded once per tile and column.

With ``FAST=False`` (Triton's interpreter, fp32 activations) the tile is decoded by plain Triton
arithmetic in fp32 instead.  ``x`` arrives in the kernel's K order (``qmatmul.py`` gathers it for
act-order layouts); only the ``error`` capture reads the full-precision weight through ``kidx``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from bitcliff.kernels.epilogue import finish, split_range


@triton.jit
def _mma(a, b, acc, INTERPRET: tl.constexpr):
    if INTERPRET or a.dtype == tl.float32:
        # The interpreter's dot has no bfloat16 (numpy); fp32 upcasts give the same exact
        # products.  fp32 activations also take this path so they are not rounded to tf32.
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _plane_codes(plane_ptr, offs_k, mask_k, offs_n, mask_n, N, WIDTH: tl.constexpr):
    """``[BLOCK_K, BLOCK_N]`` ``WIDTH``-bit fields of codes ``offs_k`` in one plane: code ``k`` sits in
    word ``k // PER``, at bit ``16 (k % 2) + WIDTH (k % PER // 2)`` (layout.code_bit)."""
    PER: tl.constexpr = 32 // WIDTH
    kin = (offs_k % PER)[:, None]
    word = tl.load(plane_ptr + (offs_k // PER)[:, None] * N + offs_n[None, :],
                   mask=mask_k[:, None] & mask_n[None, :], other=0)
    return (word >> (16 * (kin % 2) + WIDTH * (kin // 2))) & ((1 << WIDTH) - 1)


@triton.jit
def weights_portable(lo_ptr, hi_ptr, t, offs_k, mask_k, offs_n, mask_n, scales_ptr, zeros_ptr, N, KP,
                     LO: tl.constexpr, HI: tl.constexpr, GROUP_SIZE: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DTYPE: tl.constexpr):
    """``[BLOCK_K, BLOCK_N]`` weights of K tile ``t`` in ``DTYPE``, decoded in fp32 (each plane word
    read once per code it holds: the interpreter's path, and fp32 activations')."""
    q = _plane_codes(lo_ptr, offs_k, mask_k, offs_n, mask_n, N, LO)
    if HI > 0:
        q = q | (_plane_codes(hi_ptr, offs_k, mask_k, offs_n, mask_n, N, HI) << LO)
    if GROUP_SIZE == -1:
        g_off = offs_n[None, :]
        g_mask = mask_n[None, :]
    elif GROUP_SIZE % BLOCK_K == 0:
        g_off = ((t * BLOCK_K) // GROUP_SIZE) * N + offs_n[None, :]
        g_mask = mask_n[None, :]
    else:
        g_off = (offs_k // GROUP_SIZE)[:, None] * N + offs_n[None, :]
        g_mask = mask_k[:, None] & mask_n[None, :]
    scale = tl.load(scales_ptr + g_off, mask=g_mask, other=0.0).to(tl.float32)
    zero_magic = tl.load(zeros_ptr + g_off, mask=g_mask, other=0).to(tl.float32) + 8388608.0
    # float(q) - zero exactly, without an int->float conversion: q OR-ed into the mantissa of
    # 2**23 reads as 2**23 + q.  Then one rounding, to the activation dtype, of scale * (q - z).
    qf = (q | 0x4B000000).to(tl.float32, bitcast=True) - zero_magic
    return (qf * scale).to(DTYPE)


@triton.jit
def _ordered8(y0, y1, y2, y3, y4, y5, y6, y7):
    """``[..., 8]``: eight same-shaped 2-D tensors stacked in order along a new last dim."""
    q = tl.join(tl.join(tl.join(y0, y1), tl.join(y2, y3)), tl.join(tl.join(y4, y5), tl.join(y6, y7)))
    return tl.reshape(tl.permute(q, (0, 1, 4, 3, 2)), (q.shape[0], q.shape[1], 8))


@triton.jit
def weights_fast(lo_ptr, hi_ptr, t, offs_n, mask_n, scale, zero, N, KP, a,
                  WORD: tl.constexpr, ZERO_CONSTANTS: tl.constexpr, WORD_CONSTRAINTS: tl.constexpr,
                  LO: tl.constexpr, HI: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  EVEN_K: tl.constexpr):
    """``[BLOCK_N, BLOCK_K]`` weights of K tile ``t`` in the dtype of the activations ``a``,
    K-contiguous per column."""
    DTYPE = a.dtype
    tl.static_assert(HI <= 1, "the word program decodes a high plane of one bit")
    PER: tl.constexpr = 32 // LO  # codes per low-plane word
    R: tl.constexpr = BLOCK_K // PER  # words per column in the tile
    rows = t * R + tl.arange(0, R)
    n2 = offs_n[:, None]
    units = t * (BLOCK_K // 32) + tl.arange(0, BLOCK_K // 32)
    if EVEN_K:  # whole K tiles: only the columns are masked
        mask = mask_n[:, None]
        mask_hi = mask_n[:, None]
    else:
        mask = mask_n[:, None] & (rows < KP // PER)[None, :]
        mask_hi = mask_n[:, None] & (units < KP // 32)[None, :]
    w = tl.load(lo_ptr + rows[None, :] * N + n2, mask=mask, other=0)  # [BLOCK_N, R]
    if HI > 0:
        # The unit's high word serves its LO low words: low word i's pairs sit 16 / LO * i fields up.
        hu = tl.load(hi_ptr + units[None, :] * N + n2, mask=mask_hi, other=0).to(tl.uint32, bitcast=True)
        shifts = (tl.arange(0, LO) * (16 // LO)).to(tl.uint32)
        h = tl.reshape(hu[:, :, None] >> shifts[None, None, :], (BLOCK_N, R)).to(tl.int32, bitcast=True)
    else:
        h = w
    c0, c1, c2, c3, c4 = tl.inline_asm_elementwise(
        ZERO_CONSTANTS, "=r,=r,=r,=r,=r,r", [zero.to(tl.int32)[:, None]],
        dtype=(tl.int32, tl.int32, tl.int32, tl.int32, tl.int32), is_pure=True, pack=1,
    )
    s16 = (scale * 16.0).to(DTYPE).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    s2 = (s16 | (s16 << 16))[:, None]  # 16 s in both halves (the program computes (q - z)/16)
    if PER == 8:
        y0, y1, y2, y3, y4, y5, y6, y7 = tl.inline_asm_elementwise(
            WORD, WORD_CONSTRAINTS, [w, h, c0, c1, c2, c3, c4, s2],
            dtype=(DTYPE, DTYPE, DTYPE, DTYPE, DTYPE, DTYPE, DTYPE, DTYPE), is_pure=True, pack=1,
        )
        codes = _ordered8(y0, y1, y2, y3, y4, y5, y6, y7)
    else:
        y0, y1, y2, y3, y4, y5, y6, y7, y8, y9, y10, y11, y12, y13, y14, y15 = tl.inline_asm_elementwise(
            WORD, WORD_CONSTRAINTS, [w, h, c0, c1, c2, c3, c4, s2],
            dtype=(DTYPE, DTYPE, DTYPE, DTYPE, DTYPE, DTYPE, DTYPE, DTYPE,
                   DTYPE, DTYPE, DTYPE, DTYPE, DTYPE, DTYPE, DTYPE, DTYPE), is_pure=True, pack=1,
        )
        codes = tl.join(_ordered8(y0, y1, y2, y3, y4, y5, y6, y7),
                        _ordered8(y8, y9, y10, y11, y12, y13, y14, y15))  # [BLOCK_N, R, 8, 2]
        codes = tl.reshape(tl.permute(codes, (0, 1, 3, 2)), (BLOCK_N, R, 16))
    return tl.reshape(codes, (BLOCK_N, BLOCK_K))


@triton.jit
def qmm_tiled_kernel(
    # pointers (as in gemv.qmm_gemv_kernel)
    x_ptr, lo_ptr, hi_ptr, scales_ptr, zeros_ptr, kidx_ptr, bias_ptr, wfp_ptr,
    y_ptr, cap_a_ptr, cap_b_ptr, ws_ptr, lock_ptr,
    # sizes
    M, N, K, KP,
    M_BUCKET,  # autotuning key only
    # strides, in elements
    stride_xm, stride_wfp, stride_ym,
    # what to compute
    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, CAPTURE: tl.constexpr,
    LO: tl.constexpr, HI: tl.constexpr,  # bit planes of the width (layout.width): low, high (0: none)
    HAS_BIAS: tl.constexpr, PERMUTED: tl.constexpr, INTERPRET: tl.constexpr,
    DECODABLE: tl.constexpr,  # fp16/bf16 activations, compiled: the word program applies
    FAST: tl.constexpr,  # DECODABLE and every K tile inside one group: use it (qmatmul.tiled_fast)
    EVEN_K: tl.constexpr,  # BLOCK_K divides KP: the weight loads need no K mask
    WORD: tl.constexpr, ZERO_CONSTANTS: tl.constexpr, WORD_CONSTRAINTS: tl.constexpr,
    # how (tuned)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
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

    t_start, t_end = split_range(tl.cdiv(KP, BLOCK_K), SPLIT_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_fp = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for t in range(t_start, t_end):
        offs_k = t * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_k = offs_k < KP
        a = tl.load(x_rows + offs_k[None, :], mask=mask_m[:, None] & (offs_k < K)[None, :], other=0.0)

        if FAST:
            g = 0 if GROUP_SIZE == -1 else (t * BLOCK_K) // GROUP_SIZE
            scale = tl.load(scales_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            zero = tl.load(zeros_ptr + g * N + offs_n, mask=mask_n, other=0)
            wt = weights_fast(lo_ptr, hi_ptr, t, offs_n, mask_n, scale, zero, N, KP, a, WORD, ZERO_CONSTANTS,
                              WORD_CONSTRAINTS, LO, HI, BLOCK_N, BLOCK_K, EVEN_K)
            acc = tl.dot(a, tl.trans(wt), acc)
        else:
            w = weights_portable(lo_ptr, hi_ptr, t, offs_k, mask_k, offs_n, mask_n, scales_ptr, zeros_ptr,
                                 N, KP, LO, HI, GROUP_SIZE, BLOCK_N, BLOCK_K, a.dtype)
            acc = _mma(a, w, acc, INTERPRET)
        if CAPTURE == "error":
            if PERMUTED:
                src = tl.load(kidx_ptr + offs_k, mask=mask_k, other=-1)
                valid = src >= 0
            else:
                src = offs_k
                valid = offs_k < K
            wf = tl.load(
                wfp_ptr + offs_n.to(tl.int64)[None, :] * stride_wfp + src[:, None],
                mask=valid[:, None] & mask_n[None, :], other=0.0,
            ).to(a.dtype)
            acc_fp = _mma(a, wf, acc_fp, INTERPRET)

    tile_id = pid_m * num_pid_n + pid_n
    finish(acc, acc_fp, offs_m, offs_n, tile_id, M, N,
           y_ptr, stride_ym, bias_ptr, cap_a_ptr, cap_b_ptr, ws_ptr, lock_ptr,
           HAS_BIAS, CAPTURE, SPLIT_K)
