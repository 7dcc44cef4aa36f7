"""Triton dequant-matmul for 2/3/4-bit group-quantized weights, with fused error capture: the launcher.

Computes ``y = x @ dequant(W)ᵀ (+ bias)`` for fp16/bf16 activations ``x [M, K]`` and a weight in
the kernel layout of ``layout.py`` (bit planes along K, uint8 zeros, contiguous 32-aligned groups).
``kernels/reference.py`` defines the result; the kernels only make it fast.

One source serves every bit width: ``BITS``, ``GROUP_SIZE`` and ``CAPTURE`` are ``tl.constexpr``.
Three schedules, chosen by M:

* ``gemv`` (decode, ``M <= GEMV_MAX_M``, ``gemv.py``): each thread owns a few output columns for a K
  slice and decodes two codes per instruction (``decode.py``) with no shared memory;
* ``tiled`` (prefill, larger M, ``tiled.py``): dequantized weight tiles feed ``tl.dot``;
* ``dequant`` (``dequant.py``): the dense weight written once, then ``torch.matmul``.  From
  ``DEQUANT_MIN_M`` rows (plain launches on a GPU) the first launch of each shape class times it
  against ``tiled`` and the faster is kept in the tuning cache with both times.

Both split K when the output has too few tiles to fill the GPU, and both end in ``epilogue.py``
(bias, store, capture, the split-K reduction: one launch, no memset, no second pass).

Activations are handed to the kernels in the layout's K order: for an act-order layout (``kidx``)
this launcher gathers the columns first (zero at padding positions); and the gemv reads them as
int32 pairs, so rows must start at even, 4-byte aligned offsets (a copy fixes any other ``x``).

Tuning: ``triton.autotune`` over block shapes and ``SPLIT_K`` (keys: M bucket, N, K, and the
constexprs; candidate lists and pruning in ``tuning.py``), and the winner per device, Triton version
and shape class is kept in a JSON file under ``$BITCLIFF_CACHE`` (default ``~/.cache/bitcliff``) so
later runs launch it directly.  What the cache holds runs only if ``tuning.prune`` admits it for the
shape; a seeded entry (the static model's ordering of a few candidates, a prediction) is measured
on its first launch and replaced by the winner.  Under ``TRITON_INTERPRET=1`` (CPU tests) a fixed small configuration
is used and nothing is tuned.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
import triton

from bitcliff.kernels import decode
from bitcliff.kernels.dequant import dequantize
from bitcliff.kernels.gemv import qmm_gemv_kernel
from bitcliff.kernels.layout import KernelLayout, width
from bitcliff.kernels.reference import CaptureMode
from bitcliff.kernels.tiled import qmm_tiled_kernel
from bitcliff.kernels.tuning import (
    DEFAULT_CONFIGS,
    DEQUANT_MIN_M,
    GEMV_MAX_M,
    SPLIT_MAX_M,
    TUNING_CACHE,
    cached_choices,
    choose_by_measurement,
    config_dict,
    gemv_configs,
    m_bucket,
    prune_gemv,
    prune_tiled,
    tiled_configs,
)

SCHEDULES = ("auto", "gemv", "tiled", "dequant")
_DECODE_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16"}

# ---------------------------------------------------------------------------------------------
# Configurations and tuning
# ---------------------------------------------------------------------------------------------

INTERPRETED = not isinstance(qmm_gemv_kernel, triton.runtime.JITFunction)
KEY = ["M_BUCKET", "N", "K", "BITS", "GROUP_SIZE", "CAPTURE", "HAS_BIAS", "PERMUTED"]

def gemv_even(args: dict) -> bool:
    """Whether a gemv launch needs no masks in its K loop: whole tiles of units, whole column
    blocks, and activations over every kernel K position."""
    return (args["KP"] // 32) % args["BLOCK_U"] == 0 and args["N"] % args["BLOCK_N"] == 0 \
        and args["K"] == args["KP"]


_gemv = triton.heuristics({"EVEN": gemv_even})(qmm_gemv_kernel)
_gemv_tuned = triton.autotune(
    configs=gemv_configs(), key=KEY, reset_to_zero=["cap_a_ptr", "cap_b_ptr"],
    prune_configs_by={"early_config_prune": prune_gemv},
)(_gemv)
def tiled_fast(args: dict) -> bool:
    """The tiled kernel decodes with the word program when it can and each K tile lies in one group."""
    return args["DECODABLE"] and (args["GROUP_SIZE"] == -1 or args["GROUP_SIZE"] % args["BLOCK_K"] == 0)


_tiled = triton.heuristics({"FAST": tiled_fast, "EVEN_K": lambda args: args["KP"] % args["BLOCK_K"] == 0})(
    qmm_tiled_kernel)
_tiled_tuned = triton.autotune(
    configs=tiled_configs(), key=KEY, reset_to_zero=["cap_a_ptr", "cap_b_ptr"],
    prune_configs_by={"early_config_prune": prune_tiled},
)(_tiled)

_KERNELS = {"gemv": (_gemv, _gemv_tuned), "tiled": (_tiled, _tiled_tuned)}


@functools.lru_cache(maxsize=None)
def _restricted_tuner(schedule: str, configs: tuple[tuple, ...]):
    """An autotuner over just ``configs`` (sorted ``config_dict`` items, already admitted by the
    pruning): how a seed's ordered candidates are measured."""
    as_configs = []
    for items in configs:
        c = dict(items)
        warps, stages = c.pop("num_warps"), c.pop("num_stages")
        as_configs.append(triton.Config(c, num_warps=warps, num_stages=stages))
    return triton.autotune(configs=as_configs, key=KEY, reset_to_zero=["cap_a_ptr", "cap_b_ptr"])(
        _KERNELS[schedule][0])


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
    """``gemv`` for decode-sized batches, ``tiled`` otherwise (before any measured choice)."""
    return "gemv" if m <= GEMV_MAX_M else "tiled"


def _measured_schedule(x2, layout, bias, key_parts) -> str:
    """``tiled`` or ``dequant`` for a large plain launch, by timing both once per shape class."""
    key = "|".join(["choice", *map(str, key_parts)])

    def run(schedule):
        return lambda: quant_matmul(x2, layout, bias, schedule=schedule)

    return choose_by_measurement(x2.device, key, {"tiled": run("tiled"), "dequant": run("dequant")})


def _dequant_matmul(xk, layout, bias, y) -> None:
    """The ``dequant`` schedule: ``y = xk @ W_kᵀ (+ bias)`` with the dense weight in kernel K order."""
    weight = dequantize(layout, xk.dtype, decode_meta("tiled", xk.dtype, layout.bits))
    weight = weight[:, : xk.shape[1]]  # an identity K order: x may stop short of k_padded
    if bias is None:
        torch.matmul(xk, weight.t(), out=y)
    else:
        torch.addmm(bias.to(y.dtype), xk, weight.t(), out=y)


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
        schedule: ``"auto"`` (by M, and by measurement for large M), ``"gemv"``, ``"tiled"`` or
            ``"dequant"`` (no capture).
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
        if (schedule == "tiled" and capture == "none" and m >= DEQUANT_MIN_M and config is None
                and not INTERPRETED):
            schedule = _measured_schedule(x2, layout, bias, (
                layout.bits, layout.group_size, str(x.dtype).removeprefix("torch."), f"m{m_bucket(m)}",
                f"n{n}", f"k{layout.k_padded}", int(bias is not None), int(layout.kidx is not None)))
    if schedule == "dequant":
        if capture != "none":
            raise ValueError("the dequant schedule has no fused capture: use schedule 'auto' or 'tiled'")
        xk, _ = kernel_order_activations(x2, layout)
        _dequant_matmul(xk, layout, bias, y)
        return _result(y, cap_a, cap_b, lead, n, capture)
    raw, tuned = _KERNELS[schedule]
    key = None
    if config is None and not INTERPRETED:
        key = "|".join(str(v) for v in (
            schedule, layout.bits, layout.group_size, str(x.dtype).removeprefix("torch."), capture,
            f"m{m_bucket(m)}", f"n{n}", f"k{layout.k_padded}", int(bias is not None),
            int(layout.kidx is not None),
        ))
        # Only configurations the tuner's own pruning admits for this shape: one measured winner
        # runs as it is; a seed's several predicted candidates are measured here, once.
        choices = cached_choices(device, key, schedule, m, n, layout.k_padded, layout.group_size)
        if len(choices) == 1:
            config = choices[0]
        elif choices:
            tuned = _restricted_tuner(schedule, tuple(tuple(sorted(c.items())) for c in choices))
    if config is not None or INTERPRETED:
        config = dict(DEFAULT_CONFIGS[schedule], **(config or {}))
        may_split = config["SPLIT_K"] > 1
    else:
        may_split = m <= SPLIT_MAX_M  # tuning may pick a split
    # Counters for the smallest tiles any configuration uses (16 rows/columns).
    counters = (m if schedule == "gemv" else triton.cdiv(m, 16)) * triton.cdiv(n, 16)
    floats = (2 if capture == "error" else 1) * m * n
    ws, lock = _workspace(device, floats if may_split else 1, counters if may_split else 1)

    xk, k_valid = kernel_order_activations(x2, layout)
    args = (
        xk, layout.lo, layout.hi if layout.hi is not None else layout.lo,
        layout.scales, layout.zeros,
        layout.kidx if layout.kidx is not None else lock,
        bias if bias is not None else cap_a, wfp,
        y, cap_a, cap_b, ws, lock,
        m, n, k_valid, layout.k_padded, m_bucket(m),
        xk.stride(0), wfp.stride(0), y.stride(0),
    )
    spec = width(layout.bits)
    meta = dict(
        BITS=layout.bits, GROUP_SIZE=layout.group_size, CAPTURE=capture, LO=spec.lo, HI=spec.hi,
        HAS_BIAS=bias is not None, PERMUTED=layout.kidx is not None, INTERPRET=INTERPRETED,
    )
    meta.update(decode_meta(schedule, x.dtype, layout.bits))
    if config is None:
        tuned[_grid(schedule, m, n)](*args, **meta)
        TUNING_CACHE.put(device, key, config_dict(tuned.best_config))
    else:
        raw[_grid(schedule, m, n)](*args, **meta, **config)
    return _result(y, cap_a, cap_b, lead, n, capture)


def kernel_order_activations(x2: torch.Tensor, layout: KernelLayout) -> tuple[torch.Tensor, int]:
    """``x2 [M, K]`` as the kernels read it, and how many of its columns hold activations.

    Act-order layouts get ``[M, k_padded]`` in the layout's K order (zeros at padding positions).
    Otherwise ``x2`` itself when its rows start 4-byte aligned at an even length (the gemv reads
    activation pairs as int32), else a copy padded to an even length.
    """
    if layout.kidx is not None:
        source = layout.kidx.long()
        gathered = F.pad(x2, (0, 1))[:, torch.where(source >= 0, source, x2.shape[1])]
        return gathered.contiguous(), layout.k_padded
    k = x2.shape[1]
    aligned = k % 2 == 0 and x2.stride(0) % 2 == 0 and x2.data_ptr() % 4 == 0
    return (x2, k) if aligned else (F.pad(x2, (0, k % 2)).contiguous(), k)


def decode_meta(schedule: str, dtype: torch.dtype, bits: int) -> dict:
    """The decode program's constexprs for a schedule: its PTX for fp16/bf16 activations on a GPU
    (``DECODABLE``), empty for the interpreter and fp32 activations (the portable path)."""
    decodable = not INTERPRETED and dtype in _DECODE_DTYPES
    if schedule == "gemv":
        prog = decode.program(bits, _DECODE_DTYPES[dtype]) if decodable else None
        return {"FAST": decodable, "DECODE": prog.ptx if prog else "",
                "ZERO_CONSTANTS": prog.zero_constants_ptx if prog else "",
                "CONSTRAINTS": prog.constraints if prog else ""}
    prog = decode.word_program(bits, _DECODE_DTYPES[dtype]) if decodable else None
    return {"DECODABLE": decodable, "WORD": prog.ptx if prog else "",
            "ZERO_CONSTANTS": prog.zero_constants_ptx if prog else "",
            "WORD_CONSTRAINTS": prog.constraints if prog else ""}


def _grid(schedule: str, m: int, n: int):
    if schedule == "gemv":
        return lambda meta: (m, triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"])
    return lambda meta: (
        triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), 1, meta["SPLIT_K"]
    )


def _result(y, cap_a, cap_b, lead, n, capture):
    y = y.reshape(*lead, n)
    return y if capture == "none" else (y, cap_a, cap_b)
