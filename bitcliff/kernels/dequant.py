"""Dequantize a packed weight to a dense fp16/bf16 matrix on the GPU, for the ``dequant`` schedule.

For a large batch a matmul is bound by its FLOPs, not by reading the weight, and the best a fused
kernel can do is match the fp16 matmul.  The alternative is to write the dense weight once (reading
the packed bytes and writing two bytes a weight, at the memory limit) and hand it to cuBLAS; at
M = 2048 on an H200 that costs about a tenth of the matmul (``bench/sass_model.py`` predicts both).
The launcher (``qmatmul.py``) times the two on the first launch of each shape class and keeps the
faster (``tuning.py``).

The tile decode is the tiled kernel's (``tiled.py``): the word program of ``decode.py`` on a GPU,
plain Triton arithmetic in the interpreter.  The result stays in the layout's K order, ``[N, KP]``
(zero weights at padding positions), so the caller multiplies it with activations in that order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from bitcliff.kernels.layout import KernelLayout, width
from bitcliff.kernels.tiled import weights_fast, weights_portable

BLOCK_N = 64
BLOCK_K = 64  # when it divides the group size and k_padded; else 32, which always does


@triton.jit
def dequant_kernel(
    lo_ptr, hi_ptr, scales_ptr, zeros_ptr,  # the kernel layout (as in tiled.qmm_tiled_kernel)
    w_ptr,  # [N, KP] output, fp16/bf16, K contiguous
    N, KP,
    LO: tl.constexpr, HI: tl.constexpr, GROUP_SIZE: tl.constexpr, FAST: tl.constexpr,
    WORD: tl.constexpr, ZERO_CONSTANTS: tl.constexpr, WORD_CONSTRAINTS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    t = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_k = t * BLOCK_K + tl.arange(0, BLOCK_K)
    like = tl.zeros([1], dtype=w_ptr.dtype.element_ty)
    rows = offs_n.to(tl.int64)[:, None] * KP + offs_k[None, :]
    if FAST:
        g = 0 if GROUP_SIZE == -1 else (t * BLOCK_K) // GROUP_SIZE
        scale = tl.load(scales_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        zero = tl.load(zeros_ptr + g * N + offs_n, mask=mask_n, other=0)
        w = weights_fast(lo_ptr, hi_ptr, t, offs_n, mask_n, scale, zero, N, KP, like, WORD, ZERO_CONSTANTS,
                         WORD_CONSTRAINTS, LO, HI, BLOCK_N, BLOCK_K, True)  # BLOCK_K divides KP
        tl.store(w_ptr + rows, w, mask=mask_n[:, None])
    else:
        w = weights_portable(lo_ptr, hi_ptr, t, offs_k, offs_k < KP, offs_n, mask_n, scales_ptr, zeros_ptr,
                             N, KP, LO, HI, GROUP_SIZE, BLOCK_N, BLOCK_K, like.dtype)
        tl.store(w_ptr + rows, tl.trans(w), mask=mask_n[:, None])


def dequantize(layout: KernelLayout, dtype: torch.dtype, meta: dict) -> torch.Tensor:
    """``[N, KP]`` weights ``s * (q - z)`` in ``dtype`` (one rounding), in the layout's K order.

    ``meta``: the word-program constexprs (``qmatmul.decode_meta("tiled", ...)``); ``FAST`` is
    derived here from whether the program applies and the block divides the group.
    """
    n, kp = layout.out_features, layout.k_padded
    # K tiles inside one group and inside K (kernel-layout groups and k_padded are multiples of 32).
    fits = (layout.group_size == -1 or layout.group_size % BLOCK_K == 0) and kp % BLOCK_K == 0
    block_k = BLOCK_K if fits else 32
    w = torch.empty(n, kp, dtype=dtype, device=layout.device)
    hi = layout.hi if layout.hi is not None else layout.lo
    grid = (triton.cdiv(n, BLOCK_N), kp // block_k)
    dequant_kernel[grid](
        layout.lo, hi, layout.scales, layout.zeros, w, n, kp,
        LO=width(layout.bits).lo, HI=width(layout.bits).hi, GROUP_SIZE=layout.group_size, FAST=meta["DECODABLE"], WORD=meta["WORD"],
        ZERO_CONSTANTS=meta["ZERO_CONSTANTS"], WORD_CONSTRAINTS=meta["WORD_CONSTRAINTS"],
        BLOCK_N=BLOCK_N, BLOCK_K=block_k, num_warps=4,
    )
    return w
