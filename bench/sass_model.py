"""A static performance model of the dequant-matmul kernels, from their compiled sm_90 code.

    python -m bench.sass_model [--bits 2 3 4] [--batches 1 16 64 2048] [--json out.json]
                               [--seed-cache DIR] [--variants-from RESULT.json] [--jobs 2]

No GPU is needed: Triton and ptxas compile each kernel variant for sm_90a here and
``bench/sass_code.py`` reads the machine code: the K loop's instructions by class, per weight,
and whether the loop is software-pipelined.  For the Llama-3 layer shapes at each batch size, on
an H200 and an H100 (``bench/devices.py``), every configuration the autotuner would try there (its
candidates after ``tuning.prune``, the tuner's own rule) is predicted as two bounds:

* **overlapped** (optimistic): the largest of *issue*, *memory* and *tensor* (below): memory and
  compute overlap perfectly;
* **serialized** (pessimistic): their sum: a warp that loads without a pipeline (one stage, about
  one warp per scheduler) cannot load and compute at once.  Where the loop is software-pipelined
  (its weight loads are asynchronous copies) only each program's first iteration is exposed: the
  excess over the largest is divided by the iterations a program runs;

each plus a fixed launch-and-tail latency (``Device.latency_s``, an assumption).  The terms:

* **issue**: the program's warp-instructions (loop x iterations + the rest once) over the rate
  each SM can issue them, per pipe (see :data:`RATES`), on the busiest SM, scaled down when too few
  warps are resident to use the SM's four schedulers;
* **memory**: bytes moved (packed weights, scales, zeros, x, y; the fp16 weight too for ``error``
  capture; split-K's fp32 partial sums, counted as if they went to DRAM, though L2 serves them)
  over the device bandwidth;
* **tensor cores** (tiled): FLOPs over the matrix rate (half of it for ``mma.sync`` code).

An fp16 ``torch.matmul`` is modelled the same way (bytes or FLOPs, whichever binds, plus the same
latency).  The candidates of each shape are ranked by the serialized bound, then the overlapped
one; the first few form the tuning seed (``bench/seed.py``): an ordering for the tuner to
measure on the GPU, not a measurement.

**Every time here is a prediction.**  ``bench/kernels.py`` measures the real thing on a GPU and
sets each row beside these bounds; ``bench/NOTES.md`` discusses both.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import datetime as dt
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from bench.devices import DEVICES, Device
from bench.sass_code import Variant, analyse, instruction_class, instructions, k_loop  # noqa: F401

import triton  # noqa: E402  (after sass_code, which clears TRITON_INTERPRET)

from bench.compile_check import constexprs, kernel  # noqa: E402

SHAPES = ((4096, 4096), (4096, 14336), (14336, 4096), (8192, 28672), (28672, 8192))  # K x N
BATCHES = (1, 16, 64, 2048)
GROUP = 128
ROOT = Path(__file__).resolve().parents[1]
#: The sources whose compiled code the variants count: a saved result is reused only for these.
KERNEL_SOURCES = ("bitcliff/kernels/gemv.py", "bitcliff/kernels/tiled.py", "bitcliff/kernels/decode.py",
                  "bitcliff/kernels/epilogue.py", "bitcliff/kernels/layout.py", "bitcliff/kernels/qmatmul.py",
                  "bench/compile_check.py", "bench/sass_code.py")

#: Warp-instructions per clock per SM, by pipe: the issue rate of Hopper's four schedulers and the
#: per-SM throughputs of the CUDA C++ Programming Guide's arithmetic-instruction table for compute
#: capability 9.0 (results per clock / 32): 32-bit fp add/mul/fma 128 -> 4; 16-bit fp x2
#: (HFMA2: 256 results) -> 4; 32-bit integer add, shift, logic, compare, multiply-add 64 -> 2;
#: conversions 16 -> 0.5.  Memory instructions: one per clock per SM (assumed).
RATES = {"issue": 4.0, "fp32": 4.0, "fp16x2": 4.0, "int": 2.0, "conv": 0.5, "global": 1.0, "shared": 1.0}

#: The tuned meta-parameters of each schedule (with num_warps and num_stages: a configuration).
TUNED = {"gemv": ("BLOCK_N", "BLOCK_U", "SPLIT_K"), "tiled": ("BLOCK_M", "BLOCK_N", "BLOCK_K", "SPLIT_K", "GROUP_M")}


# ---------------------------------------------------------------------------------------------
# Predicting a launch
# ---------------------------------------------------------------------------------------------


def layout_bytes(k: int, n: int, bits: int, group: int) -> int:
    """Packed planes, fp16 scales and uint8 zeros (``KernelLayout.nbytes``)."""
    groups = 1 if group == -1 else -(-k // group)
    return k * n * bits // 8 + groups * n * 3


def fp16_time(k: int, n: int, m: int, dev: Device) -> float:
    """fp16 ``torch.matmul``: its bytes or FLOPs, whichever binds, plus the launch latency."""
    return max((2 * k * n + 2 * m * (k + n)) / dev.bandwidth, 2 * m * k * n / dev.matrix_flops) + dev.latency_s


def ideal_time(k: int, n: int, m: int, bits: int, dev: Device, group: int = GROUP) -> float:
    """The quantized kernel's floor: its bytes or FLOPs, whichever binds (no latency)."""
    return max((layout_bytes(k, n, bits, group) + 2 * m * (k + n)) / dev.bandwidth, 2 * m * k * n / dev.matrix_flops)


def predict(v: Variant, k: int, n: int, m: int, dev: Device, group: int = GROUP) -> dict:
    """Both predicted bounds (seconds) of one launch of variant ``v`` on ``[m, k] x [k, n]``, and
    their terms: ``overlapped_s`` <= ``serialized_s``, each including ``latency_s``."""
    c = v.config
    split = c.get("SPLIT_K", 1)
    if v.schedule == "gemv":
        programs = m * -(-n // c["BLOCK_N"]) * split
        tiles = -(-(k // 32) // c["BLOCK_U"])
    else:
        programs = -(-m // c["BLOCK_M"]) * -(-n // c["BLOCK_N"]) * split
        tiles = -(-k // c["BLOCK_K"])
    iters = -(-tiles // split)
    warps = c["num_warps"]
    # Programs resident per SM: registers, warps, shared memory.
    occupancy = max(1, min(dev.regs_per_sm // max(v.regs * 32 * warps, 1), dev.max_warps_per_sm // warps,
                           dev.max_programs_per_sm, dev.smem_per_sm // max(v.shared, 1)))
    per_sm = -(-programs // dev.sms)  # programs on the busiest SM
    resident_warps = min(per_sm, occupancy) * warps
    usable = min(1.0, resident_warps / 4)  # one warp per scheduler at least
    cycles = {}
    for cls, rate in RATES.items():
        name = "total" if cls == "issue" else cls
        count = v.loop.get(name, 0) * iters + v.rest.get(name, 0)
        cycles[cls] = per_sm * count * warps / (rate * usable)
    issue_s = max(cycles.values()) / dev.clock_hz
    bound_pipe = max(cycles, key=cycles.get)
    nbytes = layout_bytes(k, n, v.bits, group) + 2 * m * (k + n)
    if v.capture == "error":
        nbytes += 2 * k * n
    if split > 1:  # every slice adds its fp32 partial tile and the last reads the sum back
        nbytes += 4 * m * n * (split + 1) * (2 if v.capture == "error" else 1)
    memory_s = nbytes / dev.bandwidth
    tensor_s = 0.0
    if v.schedule == "tiled":
        rows = -(-m // c["BLOCK_M"]) * c["BLOCK_M"]
        flops = 2 * rows * k * n * (2 if v.capture == "error" else 1)
        tensor_s = flops / (dev.matrix_flops * (1.0 if v.hgmma else dev.mma_sync_share))
    longest = max(issue_s, memory_s, tensor_s)
    # What overlap must hide: the terms other than the largest.  A pipelined loop hides it after
    # each program's first iteration; a loop that waits for its own loads hides none of it.
    exposed = issue_s + memory_s + tensor_s - longest
    overlapped = longest + dev.latency_s
    serialized = longest + (exposed / iters if v.pipelined else exposed) + dev.latency_s
    bound = "memory" if longest == memory_s else ("tensor" if longest == tensor_s else f"issue:{bound_pipe}")
    ideal = ideal_time(k, n, m, v.bits, dev, group)
    fp16 = fp16_time(k, n, m, dev)
    return {"overlapped_s": overlapped, "serialized_s": serialized, "latency_s": dev.latency_s,
            "issue_s": issue_s, "memory_s": memory_s, "tensor_s": tensor_s, "bound": bound,
            "programs": programs, "iters": iters,
            "warps_per_sm": min(programs * warps / dev.sms, occupancy * warps), "pipelined": v.pipelined,
            "speedup_overlapped": fp16 / overlapped, "speedup_serialized": fp16 / serialized,
            "ceiling": (fp16 - dev.latency_s) / ideal}


def dequant_then_matmul(k: int, n: int, m: int, bits: int, dev: Device, group: int = GROUP) -> dict:
    """The alternative for large M: dequantize the weight to fp16 once (reading the packed bytes,
    writing 2 bytes a weight, at the memory limit; one launch) and run the fp16 matmul."""
    seconds = (layout_bytes(k, n, bits, group) + 2 * k * n) / dev.bandwidth + dev.latency_s + fp16_time(k, n, m, dev)
    return {"seconds": seconds, "bound": "dequant+fp16", "speedup": fp16_time(k, n, m, dev) / seconds}


# ---------------------------------------------------------------------------------------------
# Candidates: the autotuner's, pruned by its rule, for this checkout or an earlier commit
# ---------------------------------------------------------------------------------------------


def config_of(c) -> dict:
    """A ``triton.Config`` as the tuning cache writes it (``tuning.config_dict``)."""
    return {**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages}


def code_key(schedule: str, config: dict) -> tuple:
    """What decides a variant's compiled loop: the configuration, with every split as a split of 2
    (the split only changes a program's K range, not its code)."""
    names = TUNED[schedule] + ("num_warps", "num_stages")
    return tuple((name, min(config[name], 2) if name == "SPLIT_K" else config[name]) for name in names)


@dataclass(frozen=True)
class Source:
    """Where kernels and candidates come from: this checkout, or git commit REF (``--before``)."""

    kernel: Callable  # schedule -> the @triton.jit function
    constexprs: Callable  # (schedule, bits, capture, dtype, config) -> every constexpr of a launch
    candidates: Callable  # schedule -> list[triton.Config]
    prune: Callable  # (schedule, configs, m, n, kp, sms, group) -> the configs that may run
    current: bool = True


def current_source() -> Source:
    from bitcliff.kernels import tuning

    return Source(kernel, lambda s, b, c, d, cfg: constexprs(s, b, c, d, cfg, group=GROUP), tuning.candidates, tuning.prune)


def _module_at(ref: str, path: str, name: str):
    """Module ``path`` of the repository as it was at git ``ref``, imported under ``name``."""
    import importlib.util

    source = subprocess.run(["git", "show", f"{ref}:{path}"], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout
    folder = Path(tempfile.mkdtemp(prefix="bitcliff-before-"))
    (folder / f"{name}.py").write_text(source)
    spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


class _CpuTensor:
    device = type("D", (), {"type": "cpu"})()


def before_source(ref: str) -> Source:
    """The kernels and tuning of commit ``ref`` (the single-file ``qmatmul.py`` with the
    GPTQ-ordered planes), for a before/after comparison under the same model."""
    old = _module_at(ref, "bitcliff/kernels/qmatmul.py", "_before_qmatmul")
    old_tuning = _module_at(ref, "bitcliff/kernels/tuning.py", "_before_tuning")

    def meta(schedule, bits, capture, dtype, config):
        return {"BITS": bits, "GROUP_SIZE": GROUP, "CAPTURE": capture, "HAS_BIAS": False, "PERMUTED": False,
                "INTERPRET": False, **config}

    def prune(schedule, configs, m, n, kp, sms, group):
        args = {"M": m, "N": n, "KP": kp, "y_ptr": _CpuTensor(), "GROUP_SIZE": group}
        fn = old_tuning.prune_gemv if schedule == "gemv" else old_tuning.prune_tiled
        return fn(configs, args, GROUP_SIZE=group)

    return Source(lambda s: old._qmm_gemv_kernel if s == "gemv" else old._qmm_tiled_kernel, meta,
                  lambda s: old_tuning.gemv_configs() if s == "gemv" else old_tuning.tiled_configs(), prune,
                  current=False)


def kernels_hash() -> str:
    """Of the kernel sources and the Triton version: equal hashes compile to equal code."""
    h = hashlib.sha256(triton.__version__.encode())
    for path in KERNEL_SOURCES:
        h.update((ROOT / path).read_bytes())
    return h.hexdigest()[:16]


def _analyse_job(job: tuple) -> dict:
    """One compile and count in a worker process (this checkout's kernels)."""
    schedule, bits, capture, dtype, config = job
    return asdict(analyse(schedule, kernel(schedule), constexprs(schedule, bits, capture, dtype, config, group=GROUP),
                          bits, capture, dtype))


def compile_pool(source: Source, schedule: str, bits: int, capture: str, dtype: str, batches, devices,
                 reuse: dict, jobs: int) -> dict[tuple, Variant]:
    """The compiled variants that some shape's pruned candidates need, by :func:`code_key`; those in
    ``reuse`` (same key and kernels hash) are taken as they are."""
    needed = {}
    for m in batches:
        for k, n in SHAPES:
            for sms in sorted({d.sms for d in devices}):
                for c in source.prune(schedule, source.candidates(schedule), m, n, k, sms, GROUP):
                    cfg = config_of(c)
                    needed.setdefault(code_key(schedule, cfg), {**cfg, "SPLIT_K": min(cfg["SPLIT_K"], 2)})
    pool, todo = {}, []
    for key, cfg in needed.items():
        found = reuse.get((schedule, bits, capture, dtype, key))
        if found is not None:
            pool[key] = found
        else:
            todo.append((key, cfg))
    if todo and source.current and jobs > 1:
        with concurrent.futures.ProcessPoolExecutor(jobs) as ex:
            done = ex.map(_analyse_job, [(schedule, bits, capture, dtype, cfg) for _, cfg in todo])
            for (key, _), fields in zip(todo, done):
                pool[key] = Variant(**fields)
    else:
        for key, cfg in todo:
            meta = source.constexprs(schedule, bits, capture, dtype, cfg)
            pool[key] = analyse(schedule, source.kernel(schedule), meta, bits, capture, dtype)
    return pool


def reusable(path: Path | None) -> dict:
    """The variants of a saved result, if its kernels hash is this checkout's (else nothing)."""
    if path is None:
        return {}
    saved = json.loads(path.read_text())
    if saved.get("kernels_hash") != kernels_hash():
        print(f"{path}: compiled from other kernel sources or another Triton; compiling again", file=sys.stderr)
        return {}
    out = {}
    for fields in saved["variants"]:
        fields = {k: v for k, v in fields.items() if k != "per_weight"}
        v = Variant(**fields)
        out[(v.schedule, v.bits, v.capture, v.dtype, code_key(v.schedule, v.config))] = v
    return out


def _with_split(v: Variant, split: int) -> Variant:
    return Variant(**{**asdict(v), "config": {**v.config, "SPLIT_K": split}})


def ranked(pool: dict, source: Source, schedule: str, k: int, n: int, m: int, dev: Device) -> list[tuple]:
    """``(prediction, variant, configuration)`` of every candidate the pruning keeps for this shape,
    best first: by the serialized bound, then the overlapped one, then the tuner's order."""
    options = []
    for c in source.prune(schedule, source.candidates(schedule), m, n, k, dev.sms, GROUP):
        cfg = config_of(c)
        v = _with_split(pool[code_key(schedule, cfg)], cfg["SPLIT_K"])
        options.append((predict(v, k, n, m, dev), v, cfg))
    return sorted(options, key=lambda o: (o[0]["serialized_s"], o[0]["overlapped_s"]))


def model(bits_list, batches, captures=("none", "stats", "error"), dtype="fp16", devices=DEVICES,
          source: Source | None = None, reuse: dict | None = None, jobs: int = 1) -> dict:
    from bench.seed import seed_order
    from bitcliff.kernels.tuning import GEMV_MAX_M

    source = source or current_source()
    rows, variants_out = [], []
    for bits in bits_list:
        for capture in captures:
            for schedule in ("gemv", "tiled"):
                ms = [m for m in batches if (m <= GEMV_MAX_M) == (schedule == "gemv")]
                if not ms:
                    continue
                pool = compile_pool(source, schedule, bits, capture, dtype, ms, devices, reuse or {}, jobs)
                variants_out += [asdict(v) | {"per_weight": v.per_weight} for v in pool.values()]
                for m in ms:
                    for k, n in SHAPES:
                        for dev in devices:
                            options = ranked(pool, source, schedule, k, n, m, dev)
                            p, v, cfg = options[0]
                            rows.append(_row(bits, capture, dtype, k, n, m, dev, schedule, cfg, v, p, options,
                                             seed_order(options)))
    return {"devices": [asdict(d) for d in devices], "rates_warp_instr_per_clock_per_sm": RATES, "group": GROUP,
            "triton": triton.__version__, "kernels_hash": kernels_hash(), "rows": rows, "variants": variants_out}


def _round(value):
    return round(value, 9) if isinstance(value, float) else value


def _row(bits, capture, dtype, k, n, m, dev, schedule, cfg, v, p, options, order) -> dict:
    from bitcliff.kernels.tuning import GEMV_MAX_M

    row = {"device": dev.name, "bits": bits, "capture": capture, "dtype": dtype, "K": k, "N": n, "M": m,
           "schedule": schedule, "config": cfg, "per_weight": round(v.per_weight, 3),
           "per_weight_by_class": {c: round(x, 3) for c, x in v.per_weight_by_class().items()},
           **{key: _round(val) for key, val in p.items()}, "candidates": len(options),
           "order": [{"config": c, "overlapped_us": round(q["overlapped_s"] * 1e6, 3),
                      "serialized_us": round(q["serialized_s"] * 1e6, 3)} for q, _, c in order]}
    if m > GEMV_MAX_M and capture == "none":
        row["dequant_matmul"] = {key: _round(val) for key, val in dequant_then_matmul(k, n, m, bits, dev).items()}
    return row


# ---------------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------------


def _median(xs):
    return sorted(xs)[len(xs) // 2]


def medians(result: dict, device: str) -> dict:
    """Per (bits, M), capture none, medians over the shapes of one device's rows."""
    groups = collections.defaultdict(list)
    for r in result["rows"]:
        if r["capture"] == "none" and r.get("device", device) == device:
            groups[(r["bits"], r["M"])].append(r)
    out = {}
    for key, rs in groups.items():
        # An earlier model's result (before/after tables) has only some of these.
        out[key] = {name: _median([r[name] for r in rs]) for name in (
            "per_weight", "speedup_overlapped", "speedup_serialized", "ceiling", "overlapped_s", "serialized_s",
            "warps_per_sm") if name in rs[0]} | {
            "schedule": rs[0]["schedule"], "bound": collections.Counter(r["bound"] for r in rs).most_common(1)[0][0],
            "dequant": _median([r["dequant_matmul"]["speedup"] for r in rs]) if "dequant_matmul" in rs[0] else None}
    return out


def summary(result: dict) -> str:
    """Per device, width and M (capture none, medians over the shapes): instructions per weight,
    both predicted speedups and times, the byte ceiling and resident warps; then the capture costs."""
    lines = []
    for dev in result["devices"]:
        lines.append(f"{dev['name']} ({dev['bandwidth'] / 1e12:.1f} TB/s, {dev['sms']} SMs, "
                     f"latency {1e6 * (dev['launch_s'] + dev['tail_s']):.1f} us assumed)")
        lines.append(f"{'bits':>4} {'M':>5} {'schedule':8} {'instr/w':>7} {'speedup over-ser':>17} "
                     f"{'us over-ser':>15} {'ceiling':>7} {'warps/SM':>8} {'dequant+mm':>10}  bound")
        for (bits, m), x in sorted(medians(result, dev["name"]).items()):
            lines.append(
                f"{bits:>4} {m:>5} {x['schedule']:8} {x['per_weight']:7.2f} "
                f"{x['speedup_overlapped']:8.2f}-{x['speedup_serialized']:<8.2f} "
                f"{1e6 * x['overlapped_s']:7.1f}-{1e6 * x['serialized_s']:<7.1f} {x['ceiling']:7.2f} "
                f"{x['warps_per_sm']:8.1f} {x['dequant'] if x['dequant'] else float('nan'):10.2f}  {x['bound']}")
        lines.append(f"{'bits':>4} {'M':>5}  stats/none (serialized)   error/(fp16+none) (serialized)")
        groups = collections.defaultdict(list)
        for r in result["rows"]:
            if r.get("device", dev["name"]) == dev["name"]:
                groups[(r["bits"], r["M"], r["capture"])].append(r)
        device = Device(**dev)
        for (bits, m, capture), rs in sorted(groups.items()):
            if capture != "none":
                continue
            base = {(r["K"], r["N"]): r["serialized_s"] for r in rs}
            stats = [r["serialized_s"] / base[(r["K"], r["N"])] - 1 for r in groups.get((bits, m, "stats"), [])]
            err = [r["serialized_s"] / (base[(r["K"], r["N"])] + fp16_time(r["K"], r["N"], m, device))
                   for r in groups.get((bits, m, "error"), [])]
            if stats or err:
                lines.append(f"{bits:>4} {m:>5}  {100 * _median(stats) if stats else float('nan'):9.1f}%  "
                             f"{_median(err) if err else float('nan'):24.2f}")
    return "\n".join(lines)


def markdown_table(after: dict, device: str, before: dict | None = None) -> str:
    """Per width and batch (capture none, medians over the shapes) on ``device``: instructions per
    weight (before -> after when an earlier result is given), both predicted speedups over fp16,
    both times, the byte ceiling, resident warps per SM and what binds the overlapped bound."""
    a = medians(after, device)
    b = medians(before, before["rows"][0].get("device", device)) if before else {}
    lines = ["| bits | M | schedule | instr/weight | speedup overlapped – serialized | µs overlapped – serialized "
             "| ceiling | warps/SM | bound (overlapped) |", "|---|---|---|---|---|---|---|---|---|"]
    for key in sorted(a):
        y = a[key]
        per = f"{b[key]['per_weight']:.2f} → {y['per_weight']:.2f}" if key in b else f"{y['per_weight']:.2f}"
        lines.append(f"| W{key[0]} | {key[1]} | {y['schedule']} | {per} | "
                     f"{y['speedup_overlapped']:.2f} – {y['speedup_serialized']:.2f} | "
                     f"{1e6 * y['overlapped_s']:.1f} – {1e6 * y['serialized_s']:.1f} | {y['ceiling']:.2f} | "
                     f"{y['warps_per_sm']:.1f} | {y['bound']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    parser.add_argument("--captures", nargs="+", default=["none", "stats", "error"])
    parser.add_argument("--dtype", default="fp16", choices=("fp16", "bf16"))
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--jobs", type=int, default=1, help="processes compiling variants at once")
    parser.add_argument("--variants-from", type=Path, default=None, metavar="RESULT",
                        help="reuse the compiled counts of a saved result (when its kernels hash matches)")
    parser.add_argument("--variant", nargs=2, metavar=("SCHEDULE", "BITS"), default=None,
                        help="count one variant (compile_check's configuration) and print it as JSON")
    parser.add_argument("--seed-cache", type=Path, default=None, metavar="DIR",
                        help="write the candidates' order as a tuning seed per device for the GPU machine")
    parser.add_argument("--seed-triton", default="3.6.0", help="the GPU machine's Triton (cache file name)")
    parser.add_argument("--before", default=None, metavar="REF",
                        help="model the kernels of git commit REF instead (before/after comparisons)")
    parser.add_argument("--table", nargs="+", type=Path, metavar="RESULT", default=None,
                        help="print the Markdown table of a result (AFTER, or BEFORE AFTER) per device")
    args = parser.parse_args(argv)
    if args.table:
        results = [json.loads(p.read_text()) for p in args.table]
        after, before = results[-1], (results[0] if len(results) > 1 else None)
        for dev in after["devices"]:
            print(f"\n{dev['name']}\n\n{markdown_table(after, dev['name'], before)}")
        return 0
    if args.variant:
        from bench.compile_check import GEMV, TILED

        schedule, bits = args.variant[0], int(args.variant[1])
        meta = constexprs(schedule, bits, "none", args.dtype, GEMV if schedule == "gemv" else TILED)
        v = analyse(schedule, kernel(schedule), meta, bits, "none", args.dtype)
        print(json.dumps(asdict(v) | {"per_weight": v.per_weight}))
        return 0
    source = before_source(args.before) if args.before else current_source()
    result = model(args.bits, args.batches, tuple(args.captures), args.dtype, source=source,
                   reuse={} if args.before else reusable(args.variants_from), jobs=args.jobs)
    if args.before:
        result["kernels_from"] = args.before
    result["date"] = dt.date.today().isoformat()
    result["commit"] = _commit()
    result["label"] = "prediction (static model of the sm_90a SASS; no GPU measured these)"
    print(f"PREDICTIONS from sm_90a SASS (triton {triton.__version__}): overlapped (optimistic) and "
          f"serialized (pessimistic) bounds")
    print(summary(result))
    if args.seed_cache:
        from bench.seed import write_seeds

        for path in write_seeds(result, args.seed_cache, args.seed_triton):
            print(f"seeded {path}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=ROOT).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("BITCLIFF_COMMIT", "unknown")


if __name__ == "__main__":
    sys.exit(main())
