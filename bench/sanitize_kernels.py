"""Run every kernel path once on small shapes and check it against the reference.

    compute-sanitizer --tool memcheck python3 bench/sanitize_kernels.py [--quick]

Meant to run under compute-sanitizer (memcheck, racecheck): every schedule, bit width and
capture mode, with and without split-K, bias, act-order reordering and a multi-group K tile,
at sizes that are not multiples of any block, plus the unmasked gemv path (whole tiles) and the
``dequant`` schedule.  Configurations are fixed (no autotuning: under the sanitizer every launch is
slow).  ``--quick`` runs each schedule and width once (captures rotated), for a short lease.  Exits non-zero if any result is off.  Without CUDA it runs
through Triton's interpreter (set TRITON_INTERPRET=1 before starting Python).
"""

from __future__ import annotations

import itertools
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from bitcliff.kernels import qmatmul, reference  # noqa: E402
from bitcliff.kernels.layout import from_gptq  # noqa: E402
from bitcliff.kernels.pack import default_g_idx, num_groups, pack_qweight, pack_qzeros  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CONFIGS = {
    ("gemv", 1): {"BLOCK_N": 128, "BLOCK_U": 2, "SPLIT_K": 1, "num_warps": 1},
    ("gemv", 2): {"BLOCK_N": 64, "BLOCK_U": 1, "SPLIT_K": 3, "num_warps": 2},
    ("dequant", 1): None,
    ("tiled", 1): {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64, "SPLIT_K": 1},
    ("tiled", 2): {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "SPLIT_K": 2},
}


def case(schedule, bits, capture, split, act_order, bias, *, m=5, k=200, n=72, group=64, seed=0):
    """One launch against the reference: (ok, relative error of y)."""
    gen = torch.Generator().manual_seed(seed)
    g = num_groups(k, group)
    codes = torch.randint(0, 2**bits, (k, n), generator=gen, dtype=torch.int32)
    zeros = torch.randint(0, 2**bits, (g, n), generator=gen, dtype=torch.int32)
    scales = (torch.rand(g, n, generator=gen) * 0.02 + 0.005).half()
    g_idx = default_g_idx(k, group)
    if act_order:
        g_idx = g_idx[torch.randperm(k, generator=gen)]
    t = {"qweight": pack_qweight(codes, bits), "qzeros": pack_qzeros(zeros, bits), "scales": scales,
         "g_idx": g_idx}
    layout = from_gptq(**t, bits=bits).to(DEVICE)
    x = torch.randn(m, k, generator=gen).half()
    b = torch.randn(n, generator=gen).half() if bias else None
    dense = reference.dequantize(**t, bits=bits)
    w_fp = (dense + 0.005 * torch.randn(dense.shape, generator=gen)).half()
    out = torch.full((m, n), float("nan"), dtype=torch.float16, device=DEVICE)
    res = qmatmul.quant_matmul(
        x.to(DEVICE), layout, None if b is None else b.to(DEVICE), capture=capture,
        weight_fp=w_fp.to(DEVICE) if capture == "error" else None, schedule=schedule,
        config=CONFIGS[(schedule, split)], out=out,
    )
    y = (res if capture == "none" else res[0]).cpu().float()
    ref = reference.dequant_matmul(x, **t, bits=bits, bias=b).float()
    rel = float((y - ref).norm() / ref.norm())
    ok = bool(torch.isfinite(y).all()) and rel < 2e-3
    if capture != "none":
        a = res[1].cpu()
        expect = (reference.output_stats(ref.half())["sq_norm"] if capture == "stats"
                  else reference.output_error(x, dense, w_fp, b)["fp_sq"])
        sig = a if capture == "stats" else res[2].cpu()
        ok = ok and bool(((sig - expect).abs() <= 1e-2 * expect.abs() + 1e-3).all())
    return ok, rel


def main(argv=None) -> int:
    quick = "--quick" in (sys.argv[1:] if argv is None else argv)
    failures = 0
    rows = list(itertools.product(("gemv", "tiled"), (2, 3, 4), ("none", "stats", "error")))
    if quick:
        rows = [(s, b, ("none", "stats", "error")[(i + b) % 3]) for i, (s, b) in
                enumerate(itertools.product(("gemv", "tiled"), (2, 3, 4)))]
    cases = [dict(schedule=s, bits=b, capture=c, split=1 + i % 2, act_order=i % 3 == 0, bias=i % 2 == 0,
                  seed=i) for i, (s, b, c) in enumerate(rows)]
    # Whole tiles (no masks in the gemv loop, 128-bit activation loads) and the dense-weight schedule.
    cases += [dict(schedule="gemv", bits=b, capture="none", split=1, act_order=False, bias=False, k=256,
                   n=128, group=128, seed=40 + b) for b in (2, 3, 4)]
    cases += [dict(schedule="dequant", bits=b, capture="none", split=1, act_order=b == 3, bias=True, seed=50 + b)
              for b in (2, 3, 4)]
    for c in cases:
        ok, rel = case(**c)
        failures += not ok
        print(f"{c['schedule']:7} w{c['bits']} {c['capture']:5} split={c['split']} act_order={c['act_order']!s:5} "
              f"bias={c['bias']!s:5} rel={rel:.2e} {'ok' if ok else 'FAILED'}", flush=True)
    rows = cases
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    print(f"{len(rows) - failures}/{len(rows)} kernel paths ok")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
