"""Kernel benchmark: quantized dequant-matmul vs fp16 ``torch.matmul`` against their physical floor.

    python -m bench.kernels [--quick] [--bits 2 3 4] [--batches 1 16 64 2048] [--out DIR]

For every Llama-3-8B/70B layer shape (K x N), batch M and bit width (g128) it reports the median
time, the achieved bandwidth, the speedup over fp16, and the *ideal* speedup: the ratio of the two
floors, each the larger of bytes moved / copy bandwidth (weights + activations + output) and
FLOPs / fp16 matmul rate, i.e. the bytes ratio while memory-bound (3.82/5.02/7.31x for our W4/W3/W2
g128 layout at M=1; 3.76/4.92/7.11x with an fp16 zero per group, also recorded) and about 1 once
compute-bound, plus the fraction of that ideal reached.  The two floors of each row (bytes / measured copy bandwidth and FLOPs /
measured fp16 matmul rate) are recorded too.  Capture rows compare ``stats`` and ``error`` with
the plain kernel, and ``error`` with what it replaces (an fp16 matmul plus the quantized one).

Timing: memory-bound rows (M <= 64) replay a CUDA graph over enough copies of the weights to
exceed twice the L2 (so every call reads DRAM, and launch gaps vanish); large-M rows use
``triton.testing.do_bench`` (median, L2 flushed before each call).  The peer, GemLite (its current
API, ``GemLiteLinearTriton``; 2 and 4 bits, it has no 3-bit kernel), gets exactly the same codes,
scales, zeros and activations and is timed the same way; it is skipped with the reason when not
installed.  Each row also carries the static model's two predicted bounds for this device
(``bench/sass_model.py``: overlapped and serialized, H100 or H200 by the device's name) and where
the measurement fell against them.  Results go to ``<out>/kernels-<device>-<date>.json`` with the device,
torch/triton versions and commit.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

SHAPES = ((4096, 4096), (4096, 14336), (14336, 4096), (8192, 28672), (28672, 8192))
QUICK_SHAPES = ((4096, 4096), (4096, 14336), (14336, 4096), (8192, 28672))
BATCHES = (1, 16, 64, 2048)
GRAPH_MAX_M = 64  # rows timed by graph replay over rotated buffers
RESULTS = Path(__file__).resolve().parent / "results"


# ---------------------------------------------------------------------------------------------
# Environment, ceilings, timing
# ---------------------------------------------------------------------------------------------


def require_cuda() -> None:
    if not torch.cuda.is_available():
        print("bench: no CUDA device here; these benchmarks measure GPU kernels and refuse to run "
              "on CPU (use `pytest bench/test_cpu_bench.py` for the CPU reference paths).",
              file=sys.stderr)
        raise SystemExit(2)


def git_commit() -> str:
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True,
                               text=True, check=True).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("BITCLIFF_COMMIT", "unknown")


def environment(device: str = "cuda") -> dict:
    import triton

    if device == "cpu":
        from bitcliff.kernels.cpu_build import build_variant
        from bitcliff.numerics import cpu_model

        return {
            "device": "cpu " + cpu_model(),
            "kernel_build": build_variant(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "triton": triton.__version__,
            "commit": git_commit(),
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        }
    props = torch.cuda.get_device_properties(0)
    return {
        "device": torch.cuda.get_device_name(0),
        "sms": props.multi_processor_count,
        "memory_gib": round(props.total_memory / 2**30, 1),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "commit": git_commit(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def results_path(out: Path, env: dict, prefix: str = "") -> Path:
    slug = "".join(ch if ch.isalnum() else "-" for ch in env["device"]).strip("-").lower()
    return out / f"{prefix}{slug}-{dt.date.today().isoformat()}.json"


def time_graph(calls: list, reps: int = 20) -> float:
    """Median milliseconds per call: a CUDA graph of all ``calls`` in sequence, replayed ``reps`` times."""
    for call in calls:  # warm-up outside capture: compilation, tuning, workspaces
        call()
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / len(calls))
    times.sort()
    return times[len(times) // 2]


def time_call(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def measure_ceilings() -> dict:
    """Copy bandwidth (bytes read + written) and the fp16 matmul rate, measured here."""
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = time_call(lambda: b.copy_(a))
    del a, b
    m = 8192
    x = torch.randn(m, m, device="cuda", dtype=torch.float16)
    w = torch.randn(m, m, device="cuda", dtype=torch.float16)
    ms_mm = time_call(lambda: x @ w)
    return {"copy_GBps": 2 * n / ms / 1e6, "fp16_TFLOPs": 2 * m**3 / ms_mm / 1e9}


# ---------------------------------------------------------------------------------------------
# Problems
# ---------------------------------------------------------------------------------------------


def random_weight(k: int, n: int, bits: int, group: int) -> dict:
    """Random codes ``[K, N]`` (uint8), fp16 scales and integer zeros ``[G, N]``, on the GPU."""
    groups = 1 if group == -1 else -(-k // group)
    return {"codes": torch.randint(0, 2**bits, (k, n), dtype=torch.uint8, device="cuda"),
            "scales": (torch.rand(groups, n, device="cuda") * 0.01 + 0.001).half(),
            "zeros": torch.randint(0, 2**bits, (groups, n), dtype=torch.uint8, device="cuda")}


def kernel_layout(w: dict, bits: int, group: int):
    """Our kernel layout of ``random_weight``'s tensors (packed on the GPU)."""
    from bitcliff.kernels.layout import KernelLayout, pack_plane, width

    k, n = w["codes"].shape
    kp = -(-k // 32) * 32
    codes = torch.zeros(kp, n, dtype=torch.int64, device="cuda")
    codes[:k] = w["codes"]
    spec = width(bits)
    return KernelLayout(
        bits=bits, in_features=k, out_features=n, group_size=group,
        lo=pack_plane(codes & ((1 << spec.lo) - 1), spec.lo),
        hi=pack_plane(codes >> spec.lo, spec.hi) if spec.hi else None,
        scales=w["scales"], zeros=w["zeros"], kidx=None,
    )


def gemlite_layer(w: dict, bits: int, group: int):
    """GemLite's linear layer (its current API) holding exactly the same weights."""
    from gemlite.core import DType, GemLiteLinearTriton

    k, n = w["codes"].shape
    layer = GemLiteLinearTriton(bits, group_size=group, in_features=k, out_features=n,
                                input_dtype=DType.FP16, output_dtype=DType.FP16)
    layer.pack(w["codes"].t().contiguous(), w["scales"].t().contiguous(), w["zeros"].t().contiguous().half(), None)
    return layer


def ideal(k: int, n: int, m: int, bits: int, group: int, layout_bytes: int) -> dict:
    io = 2 * m * (k + n)  # fp16 x read + y written
    fp16 = 2 * k * n + io
    groups = 1 if group == -1 else -(-k // group)
    design = k * n * bits / 8 + groups * n * 4 + io  # the usual accounting: fp16 scale + fp16 zero
    return {
        "bytes_fp16": fp16, "bytes_q": layout_bytes + io, "flops": 2 * m * k * n,
        "ideal_speedup_bytes": fp16 / (layout_bytes + io), "ideal_speedup_design": fp16 / design,
    }


def copies_for(bytes_per_call: int, l2_bytes: int, budget: int = 3 << 30) -> int:
    """How many buffer sets to rotate through so each call misses L2 (within a memory budget)."""
    want = -(-2 * l2_bytes // max(bytes_per_call, 1))
    return max(1, min(want, budget // max(bytes_per_call, 1), 64))


def bench_row(k, n, m, bits, group, *, l2_bytes, ceilings, capture_rows: bool, peers: bool) -> dict:
    """Ours, fp16 ``torch.matmul`` and (where it has the width) GemLite on the same weights, each
    timed the same way: a CUDA graph over rotated copies (M <= 64) or do_bench."""
    from bitcliff.kernels import qmatmul

    first = random_weight(k, n, bits, group)
    layout = kernel_layout(first, bits, group)
    copies = copies_for(layout.nbytes(), l2_bytes) if m <= GRAPH_MAX_M else 1
    weights = [first] + [random_weight(k, n, bits, group) for _ in range(copies - 1)]
    layouts = [layout] + [kernel_layout(w, bits, group) for w in weights[1:]]
    xs = [torch.randn(m, k, device="cuda", dtype=torch.float16) for _ in range(copies)]
    ws = [torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.02 for _ in range(copies)]

    def timed(make):
        calls = [make(i) for i in range(copies)]
        if m <= GRAPH_MAX_M:
            return time_graph(calls)
        return time_call(calls[0])

    row = {"K": k, "N": n, "M": m, "bits": bits, "group": group, "copies": copies}
    row["ms"] = timed(lambda i: (lambda: qmatmul.quant_matmul(xs[i], layouts[i])))
    row["schedule"] = chosen_schedule(qmatmul, xs[0], layout)
    row["fp16_ms"] = timed(lambda i: (lambda: torch.matmul(xs[i], ws[i].t())))
    row.update(ideal(k, n, m, bits, group, layout.nbytes()))
    row["GBps"] = row["bytes_q"] / row["ms"] / 1e6
    row["speedup"] = row["fp16_ms"] / row["ms"]
    row["floor_bytes_ms"] = row["bytes_q"] / ceilings["copy_GBps"] / 1e6
    row["floor_flops_ms"] = row["flops"] / ceilings["fp16_TFLOPs"] / 1e9
    row["floor_ms"] = max(row["floor_bytes_ms"], row["floor_flops_ms"])
    row["fp16_floor_ms"] = max(row["bytes_fp16"] / ceilings["copy_GBps"] / 1e6, row["floor_flops_ms"])
    # The best speedup physics allows: the bytes ratio while memory-bound, ~1 once compute-bound.
    row["ideal_speedup"] = row["fp16_floor_ms"] / row["floor_ms"]
    row["fraction_of_ideal"] = row["speedup"] / row["ideal_speedup"]
    row["fraction_of_floor"] = row["floor_ms"] / row["ms"]
    y = qmatmul.quant_matmul(xs[0], layout).float()
    dense = (first["scales"].float().repeat_interleave(group if group > 0 else k, 0)[:k]
             * (first["codes"].float() - first["zeros"].float().repeat_interleave(group if group > 0 else k, 0)[:k]))
    ref = xs[0].float() @ dense
    row["rel_err"] = float((y - ref).norm() / ref.norm())
    if capture_rows:
        row["stats_ms"] = timed(lambda i: (lambda: qmatmul.quant_matmul(xs[i], layouts[i], capture="stats")))
        row["error_ms"] = timed(lambda i: (lambda: qmatmul.quant_matmul(
            xs[i], layouts[i], capture="error", weight_fp=ws[i])))
        row["stats_overhead"] = row["stats_ms"] / row["ms"] - 1
        row["error_vs_plain"] = row["error_ms"] / row["ms"]
        row["error_vs_fp16_plus_q"] = row["error_ms"] / (row["fp16_ms"] + row["ms"])
    if peers:
        row.update(bench_gemlite(weights, xs, bits, group, timed, y))
    del layouts, xs, ws, weights
    torch.cuda.empty_cache()
    return row


def chosen_schedule(qmatmul, x, layout) -> str:
    """The schedule a plain launch used (for large M the measured choice, with both times)."""
    from bitcliff.kernels import tuning

    schedule = qmatmul.choose_schedule(x.shape[0])
    if schedule != "tiled" or x.shape[0] < tuning.DEQUANT_MIN_M:
        return schedule
    key = "|".join(str(v) for v in ("choice", layout.bits, layout.group_size, "float16",
                                    f"m{tuning.m_bucket(x.shape[0])}", f"n{layout.out_features}",
                                    f"k{layout.k_padded}", 0, 0))
    entry = tuning.TUNING_CACHE.get(x.device, key) or {}
    times = ", ".join(f"{k} {v:.3f} ms" for k, v in entry.get("ms", {}).items())
    return f"{entry.get('schedule', schedule)} ({times})" if entry else schedule


def bench_gemlite(weights, xs, bits, group, timed, y_ours) -> dict:
    """GemLite on the same weights and activations, timed as ours; skipped with the reason when it
    is not installed or has no kernel for the width."""
    try:
        layers = [gemlite_layer(w, bits, group) for w in weights]
        y = layers[0](xs[0]).float()
        out = {"gemlite_ms": timed(lambda i: (lambda: layers[i](xs[i]))),
               "gemlite_vs_ours_rel_diff": float((y - y_ours).norm() / y_ours.norm())}
        del layers
        return out
    except Exception as exc:  # noqa: BLE001 - an optional peer: record why it did not run
        return {"gemlite": f"skipped: {type(exc).__name__}: {exc}"[:200]}


def predictions(device_name: str) -> dict:
    """The static model's predictions for this device (``bench/results/sass-*.json``, newest; the
    H100 or H200 rows, ``bench/devices.py``), by (bits, K, N, M); none for another device."""
    from bench.devices import device_for

    found = sorted(RESULTS.glob("sass-2*.json"))  # dated results, newest last (not sass-before-*)
    device = device_for(device_name)
    if not found or device is None:
        return {}
    rows = json.loads(found[-1].read_text())["rows"]
    return {(r["bits"], r["K"], r["N"], r["M"]): r for r in rows
            if r["capture"] == "none" and r.get("device") == device.name}


def beside_prediction(row: dict, p: dict) -> dict:
    """The measured row against both predicted bounds: the times, the speedups, and where the
    measurement fell (below the overlapped bound, between the two, or above the serialized one)."""
    ms, over, ser = row["ms"], p["overlapped_s"] * 1e3, p["serialized_s"] * 1e3
    return {"predicted_us": [round(over * 1e3, 3), round(ser * 1e3, 3)],
            "predicted_speedup": [p["speedup_serialized"], p["speedup_overlapped"]],
            "measured_vs_bounds": "faster than both" if ms < over else ("between" if ms <= ser else "slower than both"),
            "error_vs_overlapped": ms / over - 1, "error_vs_serialized": ms / ser - 1}


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def summary_table(rows: list[dict]) -> str:
    head = (f"{'K x N':>13} {'M':>5} {'b':>2} {'us':>9} {'GB/s':>7} {'fp16 us':>9} {'speedup':>7} "
            f"{'predicted':>9} {'ideal':>6} {'frac':>5} {'stats+':>7} {'err/(fp+q)':>10} {'gemlite':>8}")
    lines = [head]
    for r in rows:
        stats = f"{100 * r['stats_overhead']:6.1f}%" if "stats_overhead" in r else f"{'':>7}"
        err = f"{r['error_vs_fp16_plus_q']:10.2f}" if "error_vs_fp16_plus_q" in r else f"{'':>10}"
        pred = (f"{r['predicted_speedup'][0]:4.1f}-{r['predicted_speedup'][1]:<4.1f}" if "predicted_speedup" in r
                else f"{'':>9}")
        peer = f"{r['fp16_ms'] / r['gemlite_ms']:8.2f}" if "gemlite_ms" in r else f"{'-':>8}"
        lines.append(
            f"{r['K']:>6}x{r['N']:<6} {r['M']:>5} {r['bits']:>2} {1000 * r['ms']:9.1f} {r['GBps']:7.0f} "
            f"{1000 * r['fp16_ms']:9.1f} {r['speedup']:7.2f} {pred} {r['ideal_speedup']:6.2f} "
            f"{r['fraction_of_ideal']:5.2f} {stats} {err} {peer}"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    parser.add_argument("--group", type=int, default=128)
    parser.add_argument("--quick", action="store_true", help="four shapes, capture rows at 4-bit only")
    parser.add_argument("--shapes", nargs="+", default=None, metavar="KxN", help="instead of the Llama-3 list")
    parser.add_argument("--no-peers", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    require_cuda()
    env = environment()
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20)
    ceilings = measure_ceilings()
    from bench.devices import device_for

    preset = device_for(env["device"])
    assumed = (f" (the model assumes {preset.bandwidth / 1e9:.0f} GB/s, {preset.matrix_flops / 1e12:.0f} TFLOP/s, "
               f"{preset.sms} SMs)" if preset else " (no model preset for this device: no predictions)")
    print(f"{env['device']}: copy {ceilings['copy_GBps']:.0f} GB/s, fp16 matmul "
          f"{ceilings['fp16_TFLOPs']:.0f} TFLOP/s{assumed}; torch {env['torch']}, triton {env['triton']}", flush=True)
    shapes = QUICK_SHAPES if args.quick else SHAPES
    if args.shapes:
        shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes]
    predicted = predictions(env["device"])
    rows = []
    started = time.time()
    for k, n in shapes:
        for m in args.batches:
            for bits in args.bits:
                capture_rows = bits == 4 or not args.quick
                row = bench_row(k, n, m, bits, args.group, l2_bytes=l2, ceilings=ceilings, capture_rows=capture_rows,
                                peers=not args.no_peers)
                p = predicted.get((bits, k, n, m))
                if p:  # the static model's two bounds and where the measurement fell
                    row.update(beside_prediction(row, p))
                rows.append(row)
                print(summary_table([row]).splitlines()[1], flush=True)
    result = {"environment": env, "ceilings": ceilings, "group": args.group, "rows": rows,
              "seconds": round(time.time() - started, 1),
              "predictions": "bench/results/sass-*.json (static model of the sm_90a code; both bounds)"}
    args.out.mkdir(parents=True, exist_ok=True)
    path = results_path(args.out, env, "kernels-")
    path.write_text(json.dumps(result, indent=1))
    table = summary_table(rows)
    (args.out / "kernels-summary.txt").write_text(table + "\n")
    print(f"\nwrote {path}\n{table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
