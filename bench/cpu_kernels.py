"""CPU dequant-matmul against fp32 and bf16 ``nn.Linear`` and against the memory floor.

    python -m bench.cpu_kernels [--shapes smollm2 llama3] [--rows 1 4 16 128 512] [--bits 4 3 2]
                                [--groups 64 128] [--threads 1 2] [--out bench/results/cpu-kernels.jsonl]

For each layer shape (K x N), row count M, thread count and width it times ``y = x @ W`` through
the CPU path ``QuantLinear`` runs (``bitcliff.kernels.cpu``), with fp32 and bf16 ``F.linear`` on
the weight as ``nn.Linear`` holds it (``[N, K]``; what a full-precision model runs: a bf16 matmul
against a ``[K, N]`` copy takes a slow path, 58x slower at 4096 x 14336 on a 2-core AVX2 machine)
on the same activations in the same run, and the peer for 4-bit: torch's own
``_weight_int4pack_mm_for_cpu`` (bf16 activations; GPTQModel's CPU kernels call it).  Each call reads its weights from memory, not from a
cache: the timed calls rotate over enough copies of the weights to exceed 256 MB.

Every row carries the bytes the call must read (weights as stored, activations, output), the
*byte floor* (those bytes over the read bandwidth measured at the start with the same thread
count), the fraction of the floor reached, the speedup over fp32 and bf16, and tokens/s
equivalent (M / seconds).  Rows are appended to the JSONL file as they finish; a rerun skips the
rows already there (delete the file to measure again).  Run it alone on the machine: a timing is
a ratio measured in one run, and anything else running skews it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from bench.provenance import commit, now

SHAPES = {
    "smollm2": {"attn.q_proj 576x576": (576, 576), "mlp.up_proj 576x1536": (576, 1536),
                "mlp.down_proj 1536x576": (1536, 576)},
    "smollm2-head": {"lm_head 576x49152": (576, 49152)},  # the tied unembedding, kept unquantized
    "llama3": {"attn.q_proj 4096x4096": (4096, 4096), "mlp.up_proj 4096x14336": (4096, 14336),
               "mlp.down_proj 14336x4096": (14336, 4096)},
}
RESULTS = Path(__file__).resolve().parent / "results" / "cpu-kernels.jsonl"


def read_bandwidth(threads: int, nbytes: int = 512 * 2**20) -> float:
    """Bytes/s of a sum over ``nbytes`` of fp32 (a pure read), best of 5, with ``threads`` threads."""
    torch.set_num_threads(threads)
    data = torch.ones(nbytes // 4)
    data.sum()
    best = min(_seconds(data.sum) for _ in range(5))
    return data.nbytes / best


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def time_rotating(fn, operands: list, reps: int) -> float:
    """Median seconds of ``fn(operand)`` over ``reps`` passes through ``operands`` (one warm-up)."""
    for operand in operands:
        fn(operand)
    times = []
    for _ in range(reps):
        for operand in operands:
            times.append(_seconds(lambda: fn(operand)))
    return statistics.median(times)


def _torch_int4(weight: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The peer: torch's own 4-bit CPU matmul (``_weight_int4pack_mm_for_cpu``, what GPTQModel's
    CPU kernels call), bf16 activations, the same RTN codes and scales as bitcliff's W4 (its zero
    is a float offset, ``w = (q - 8) * s + zero``).  Returns (packed weight, scales and zeros)."""
    from bitcliff import QuantConfig
    from bitcliff.quant.rtn import quantize_rtn

    qw = quantize_rtn(weight, QuantConfig(bits=4, group_size=group))
    codes = qw.codes.t().contiguous().to(torch.int32)  # [N, K]
    scales, zeros = qw.scales.float(), qw.zeros.float()  # [G, N]
    scales_and_zeros = torch.stack([scales, scales * (8 - zeros)], dim=-1).to(torch.bfloat16)
    return torch._convert_weight_to_int4pack_for_cpu(codes, 1), scales_and_zeros


def _copy(layout):
    """A copy of a CPU layout with its own tensors (another place in memory)."""
    tensors = {f.name: getattr(layout, f.name).clone() for f in dataclasses.fields(layout)
               if isinstance(getattr(layout, f.name), torch.Tensor)}
    return dataclasses.replace(layout, **tensors)


def copies_for(nbytes: int, rotate_bytes: int) -> int:
    """Copies of a weight that together exceed ``rotate_bytes`` (at most 64)."""
    return max(1, min(64, -(-rotate_bytes // max(nbytes, 1))))


def quantized_layer(weight: torch.Tensor, bits: int, group: int):
    from bitcliff import QuantConfig
    from bitcliff.quant.qlinear import QuantLinear
    from bitcliff.quant.rtn import quantize_rtn

    layer = QuantLinear.from_quantized(quantize_rtn(weight, QuantConfig(bits=bits, group_size=group)), group)
    return layer


def measure_shape(name: str, k: int, n: int, args, done: set, write) -> None:
    from bitcliff.kernels import cpu

    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(n, k, generator=gen) * 0.02
    layouts = {}
    for rows in args.rows:
        x = torch.randn(rows, k, generator=gen)
        for threads in args.threads:
            torch.set_num_threads(threads)
            bandwidth = args.bandwidth[threads]
            io_bytes = rows * k * 4 + rows * n * 4
            base = {}
            peers = [f"torch-int4g{g}" for g in args.groups if 4 in args.bits and k % g == 0]
            for variant in ["fp32", "bf16", *[f"w{b}g{g}" for b in args.bits for g in args.groups], *peers]:
                key = (name, rows, threads, variant)
                if key in done:
                    base[variant] = done[key]
                    continue
                if variant == "bf16" and rows > args.bf16_max_rows:
                    continue
                if variant in ("fp32", "bf16"):
                    dtype = torch.float32 if variant == "fp32" else torch.bfloat16
                    wd = weight.to(dtype).contiguous()  # [N, K], as nn.Linear holds it
                    operands = [wd.clone() for _ in range(copies_for(wd.nbytes, args.rotate_mb * 2**20))]
                    xd = x.to(dtype)
                    seconds = time_rotating(lambda w: torch.nn.functional.linear(xd, w), operands, args.reps)
                    weight_bytes = wd.nbytes
                elif variant.startswith("torch-int4"):
                    group = int(variant.split("g")[-1])
                    packed = _torch_int4(weight, group)
                    weight_bytes = sum(t.nbytes for t in packed)
                    operands = [packed] + [tuple(t.clone() for t in packed)
                                           for _ in range(copies_for(weight_bytes, args.rotate_mb * 2**20) - 1)]
                    xb = x.to(torch.bfloat16)
                    seconds = time_rotating(lambda p: torch._weight_int4pack_mm_for_cpu(xb, p[0], group, p[1]),
                                            operands, args.reps)
                else:
                    bits, group = (int(part) for part in variant[1:].split("g"))
                    if (bits, group) not in layouts:
                        layouts[bits, group] = quantized_layer(weight, bits, group).kernel_layout()
                    layout = layouts[bits, group]
                    weight_bytes = layout.nbytes()
                    operands = [layout] + [_copy(layout) for _ in range(copies_for(weight_bytes, args.rotate_mb * 2**20) - 1)]
                    seconds = time_rotating(lambda lay: cpu.matmul(x, lay), operands, args.reps)
                floor = (weight_bytes + io_bytes) / bandwidth
                row = {"shape": name, "k": k, "n": n, "rows": rows, "threads": threads, "variant": variant,
                       "seconds": seconds, "bytes": weight_bytes + io_bytes,
                       "bits_per_weight": 8 * weight_bytes / (k * n), "byte_floor_s": floor,
                       "fraction_of_floor": floor / seconds, "tokens_per_s": rows / seconds,
                       "read_bandwidth_gbs": bandwidth / 1e9}
                for ref in ("fp32", "bf16"):
                    if ref in base and variant != ref:
                        row[f"speedup_vs_{ref}"] = base[ref] / seconds
                base[variant] = seconds
                write(row)
                done[key] = seconds
                ratio = f"{row.get('speedup_vs_fp32', 1.0):5.2f}x fp32"
                print(f"{name:>26} M={rows:<4} t={threads} {variant:>8}: {seconds * 1e3:9.3f} ms  "
                      f"{row['fraction_of_floor']:5.0%} of floor  {ratio}", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=["smollm2", "smollm2-head", "llama3"])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16, 128, 512])
    parser.add_argument("--bits", type=int, nargs="+", choices=[2, 3, 4], default=[4, 3, 2])
    parser.add_argument("--groups", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--reps", type=int, default=5, help="passes over the rotated weights per row")
    parser.add_argument("--rotate-mb", type=int, default=256,
                        help="the timed calls rotate over copies of the weights exceeding this many MiB")
    parser.add_argument("--bf16-max-rows", type=int, default=512,
                        help="bf16 only up to this many rows (without native bf16 a large M is slow)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if any(r < 1 for r in args.rows) or any(t < 1 for t in args.threads) or args.reps < 1 or args.rotate_mb < 1:
        parser.error("--rows, --threads, --reps and --rotate-mb must be positive")
    from bitcliff.kernels.cpu_build import build_variant, native_ops
    from bitcliff.numerics import cpu_model

    path_taken = "compiled " + native_ops().isa() if native_ops() is not None else "plain torch (no compiler)"
    done = {}
    if args.out.exists():
        for line in args.out.read_text().splitlines():
            row = json.loads(line)
            if "variant" in row:
                done[row["shape"], row["rows"], row["threads"], row["variant"]] = row["seconds"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.bandwidth = {t: read_bandwidth(t, max(2 * args.rotate_mb, 8) * 2**20) for t in args.threads}
    with args.out.open("a") as sink:
        def write(row):
            sink.write(json.dumps(row) + "\n")
            sink.flush()

        write({"environment": {"cpu": cpu_model(), "torch": torch.__version__, "commit": commit(), "date": now(),
                               "cpu_path": path_taken, "build": build_variant(),
                               "read_bandwidth_gbs": {t: b / 1e9 for t, b in args.bandwidth.items()}}})
        for group in args.shapes:
            for name, (k, n) in SHAPES[group].items():
                measure_shape(name, k, n, args, done, write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
