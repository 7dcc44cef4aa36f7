"""A static performance model of the dequant-matmul kernels, from their compiled sm_90 code.

    python -m bench.sass_model [--bits 2 3 4] [--batches 1 16 64 2048] [--json out.json]

No GPU is needed: Triton and ptxas compile each kernel variant for sm_90a here, and this script reads
the machine code (SASS).  For every variant it finds the K loop (the backward branch whose body
holds the weight loads), counts the instructions of one iteration by class, and divides by the
weights one thread handles per iteration: *instructions per weight*, the number that decides whether
a gemv can run at the memory limit (``bench/NOTES.md``).  It then predicts, for the Llama-3 layer
shapes at each batch size, the kernel time as the largest of

* **issue**: the program's warp-instructions (loop x iterations + the rest once) over the rate
  each SM can issue them, per pipe (see :data:`RATES`), scaled down when too few warps are resident
  to use the SM's four schedulers;
* **memory**: bytes moved (packed weights, scales, zeros, x, y; the fp16 weight too for ``error``
  capture; split-K's fp32 partial sums, counted as if they went to DRAM, though L2 serves them)
  over the device bandwidth;
* **tensor cores** (tiled): FLOPs over the matrix rate (half of it for ``mma.sync`` code),

and compares it with an fp16 ``torch.matmul`` modelled the same way (bytes or FLOPs, whichever
binds).  For each shape the configuration with the best prediction among the autotuner's
candidates is chosen, as the tuner would on the GPU.

**Every time here is a prediction**, not a measurement: it assumes perfect overlap of memory and
issue, full bandwidth once enough warps are resident, and the rates below.  ``bench/kernels.py``
measures the real thing on a GPU, and ``bench/NOTES.md`` sets the two side by side.
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import triton  # noqa: E402

from bench.compile_check import compile_variant, constexprs, kernel  # noqa: E402

SHAPES = ((4096, 4096), (4096, 14336), (14336, 4096), (8192, 28672), (28672, 8192))  # K x N
BATCHES = (1, 16, 64, 2048)
GROUP = 128


@dataclass(frozen=True)
class Device:
    """The figures the model assumes, with where each comes from."""

    name: str = "NVIDIA H200"
    sms: int = 132  # device query on the H200 lent here (shared/gpu-machine.md)
    clock_hz: float = 1.98e9  # SM clock read by nvidia-smi under load on that machine
    bandwidth: float = 4.3e12  # B/s, a device-to-device copy measured there (read + write)
    matrix_flops: float = 790e12  # bf16/fp16 dense matmul measured there through torch
    mma_sync_share: float = 0.5  # assumed: mma.sync (HMMA) code reaches half of the wgmma rate
    regs_per_sm: int = 65536
    max_warps_per_sm: int = 64
    max_programs_per_sm: int = 32
    smem_per_sm: int = 228 * 1024


#: Warp-instructions per clock per SM, by pipe: the issue rate of Hopper's four schedulers and the
#: per-SM throughputs of the CUDA C++ Programming Guide's arithmetic-instruction table for compute
#: capability 9.0 (results per clock / 32): 32-bit fp add/mul/fma 128 -> 4; 16-bit fp x2
#: (HFMA2: 256 results) -> 4; 32-bit integer add, shift, logic, compare, multiply-add 64 -> 2;
#: conversions 16 -> 0.5.  Memory instructions: one per clock per SM (assumed).
RATES = {"issue": 4.0, "fp32": 4.0, "fp16x2": 4.0, "int": 2.0, "conv": 0.5, "global": 1.0, "shared": 1.0}

CLASSES = {
    "fp32": "FADD FMUL FFMA FMNMX FSEL FSET FSETP FCHK FSWZADD MUFU",
    "fp16x2": "HADD2 HMUL2 HFMA2 HMNMX2 HSET2 HSETP2",
    "int": ("LOP3 LOP SHF SHL SHR IADD3 IADD IMAD IMUL LEA ISETP ICMP SEL PRMT SGXT BMSK BFE BFI IABS "
            "IMNMX VIADD VIMNMX VIADDMNMX MOV P2R R2P PLOP3 POPC FLO BREV CS2R S2R IDP IDP4A"),
    "conv": "I2F F2I F2F I2FP F2FP FRND I2I",
    "global": "LDG STG LD ST RED ATOM ATOMG LDC REDG",
    "shared": "LDS STS LDSM STSM LDGSTS ATOMS BAR SHFL UTMALDG UTMASTG SYNCS",
    "tensor": "HMMA HGMMA IMMA QGMMA WARPGROUP",
}
_CLASS_OF = {op: cls for cls, ops in CLASSES.items() for op in ops.split()}


def instruction_class(opcode: str) -> str:
    root = opcode.split(".")[0]
    if root in _CLASS_OF:
        return _CLASS_OF[root]
    if root.startswith("U"):
        return "uniform"  # the uniform datapath: an issue slot, no vector pipe
    return "other"


# ---------------------------------------------------------------------------------------------
# Reading the machine code
# ---------------------------------------------------------------------------------------------

_SASS_LINE = re.compile(r"\s+/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


def disassemble(cubin: bytes) -> str:
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([str(cuobjdump), "--dump-sass", f.name], capture_output=True, text=True,
                              check=True).stdout


def instructions(sass: str) -> list[tuple[int, str, str]]:
    """(address, opcode, operands) of every instruction."""
    return [(int(m.group(1), 16), m.group(2), m.group(3)) for m in map(_SASS_LINE.match, sass.splitlines()) if m]


def k_loop(code: list[tuple[int, str, str]]) -> list[tuple[int, str, str]]:
    """The body of the K loop: of the loops closed by a backward branch, the one with the most
    global or asynchronous loads (the weight stream).  Raises if the code has no loop."""
    loops = []
    for i, (addr, op, rest) in enumerate(code):
        target = re.search(r"0x([0-9a-f]+)", rest) if op == "BRA" else None
        if target and int(target.group(1), 16) < addr:
            start = next(j for j, (a, _, _) in enumerate(code) if a == int(target.group(1), 16))
            body = code[start:i + 1]
            loads = sum(o.split(".")[0] in ("LDG", "LDGSTS", "UTMALDG") for _, o, _ in body)
            loops.append((loads, len(body), body))
    if not loops:
        raise ValueError("no loop found in the SASS")
    return max(loops, key=lambda x: (x[0], x[1]))[2]


def count_classes(code) -> dict[str, int]:
    counts = collections.Counter(instruction_class(op) for _, op, _ in code)
    counts["total"] = len(code)
    return dict(counts)


def resources(cubin: bytes) -> dict:
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([str(cuobjdump), "--dump-resource-usage", f.name], capture_output=True,
                               text=True, check=True).stdout
    res = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    return {"regs": int(res.get("REG", 0)), "stack": int(res.get("STACK", 0)) + int(res.get("LOCAL", 0))}


@dataclass
class Variant:
    """One compiled kernel variant and what its code costs."""

    schedule: str
    bits: int
    capture: str
    dtype: str
    config: dict
    weights_per_thread_iter: int
    loop: dict = field(default_factory=dict)  # class -> instructions per iteration per thread
    rest: dict = field(default_factory=dict)  # class -> instructions outside the loop, per thread
    regs: int = 0
    shared: int = 0
    hgmma: bool = False

    @property
    def per_weight(self) -> float:
        return self.loop["total"] / self.weights_per_thread_iter

    def per_weight_by_class(self) -> dict[str, float]:
        return {k: v / self.weights_per_thread_iter for k, v in self.loop.items() if k != "total"}


def analyse(schedule: str, kernel, constexprs: dict, bits: int, capture: str, dtype: str) -> Variant:
    compiled = compile_variant(kernel, constexprs, 90, dtype)
    code = instructions(disassemble(compiled.asm["cubin"]))
    body = k_loop(code)
    threads = 32 * constexprs["num_warps"]
    if schedule == "gemv":
        weights = constexprs["BLOCK_N"] * 32 * constexprs["BLOCK_U"] // threads
    else:
        weights = constexprs["BLOCK_N"] * constexprs["BLOCK_K"] // threads
    loop = count_classes(body)
    everything = count_classes(code)
    rest = {k: everything.get(k, 0) - loop.get(k, 0) for k in everything}
    config = {k: v for k, v in constexprs.items() if k.isupper() and not isinstance(v, str)
              and k not in ("BITS", "INTERPRET")} | {
        "num_warps": constexprs["num_warps"], "num_stages": constexprs["num_stages"]}
    return Variant(schedule, bits, capture, dtype, config, weights, loop, rest,
                   regs=resources(compiled.asm["cubin"])["regs"], shared=compiled.metadata.shared,
                   hgmma=any(op.startswith("HGMMA") for _, op, _ in code))


# ---------------------------------------------------------------------------------------------
# Predicting a launch
# ---------------------------------------------------------------------------------------------


def layout_bytes(k: int, n: int, bits: int, group: int) -> int:
    """Packed planes, fp16 scales and uint8 zeros (``KernelLayout.nbytes``)."""
    groups = 1 if group == -1 else -(-k // group)
    return k * n * bits // 8 + groups * n * 3


def fp16_time(k: int, n: int, m: int, dev: Device) -> float:
    return max((2 * k * n + 2 * m * (k + n)) / dev.bandwidth, 2 * m * k * n / dev.matrix_flops)


def predict(v: Variant, k: int, n: int, m: int, dev: Device, group: int = GROUP) -> dict:
    """Predicted seconds of one launch of variant ``v`` on ``[m, k] x [k, n]``, and what binds it."""
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
    occupancy = min(dev.regs_per_sm // max(v.regs * 32 * warps, 1), dev.max_warps_per_sm // warps,
                    dev.max_programs_per_sm, dev.smem_per_sm // max(v.shared, 1))
    per_sm = -(-programs // dev.sms)  # programs on the busiest SM
    resident_warps = min(per_sm, max(occupancy, 1)) * warps
    usable = min(1.0, resident_warps / 4)  # one warp per scheduler at least
    cycles = {}
    for cls, rate in RATES.items():
        count = v.loop.get("total" if cls == "issue" else cls, 0) * iters + \
            v.rest.get("total" if cls == "issue" else cls, 0)
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
    seconds = max(issue_s, memory_s, tensor_s)
    bound = "memory" if seconds == memory_s else ("tensor" if seconds == tensor_s else f"issue:{bound_pipe}")
    ideal = max((layout_bytes(k, n, v.bits, group) + 2 * m * (k + n)) / dev.bandwidth,
                2 * m * k * n / dev.matrix_flops)
    fp16 = fp16_time(k, n, m, dev)
    return {"seconds": seconds, "issue_s": issue_s, "memory_s": memory_s, "tensor_s": tensor_s,
            "bound": bound, "programs": programs, "speedup": fp16 / seconds, "ceiling": fp16 / ideal,
            "fraction": ideal / seconds}


def dequant_then_matmul(k: int, n: int, m: int, bits: int, dev: Device, group: int = GROUP) -> dict:
    """The alternative for large M: dequantize the weight to fp16 once (reading the packed bytes,
    writing 2 bytes a weight, at the memory limit) and run the fp16 matmul."""
    seconds = (layout_bytes(k, n, bits, group) + 2 * k * n) / dev.bandwidth + fp16_time(k, n, m, dev)
    ideal = max((layout_bytes(k, n, bits, group) + 2 * m * (k + n)) / dev.bandwidth, 2 * m * k * n / dev.matrix_flops)
    fp16 = fp16_time(k, n, m, dev)
    return {"seconds": seconds, "bound": "dequant+fp16", "speedup": fp16 / seconds,
            "ceiling": fp16 / ideal, "fraction": ideal / seconds}


# ---------------------------------------------------------------------------------------------
# The variants of today's kernels
# ---------------------------------------------------------------------------------------------


def gemv_candidates(bits: int, capture: str, dtype: str):
    """The autotuner's gemv configurations (one compile per shape of code: split or not)."""
    from bitcliff.kernels import tuning

    seen = set()
    for cfg in tuning.gemv_configs():
        config = {"BLOCK_N": cfg.kwargs["BLOCK_N"], "BLOCK_U": cfg.kwargs["BLOCK_U"],
                  "SPLIT_K": min(cfg.kwargs["SPLIT_K"], 2), "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
        if tuple(config.values()) not in seen:
            seen.add(tuple(config.values()))
            yield kernel("gemv"), constexprs("gemv", bits, capture, dtype, config, GROUP)


def tiled_candidates(bits: int, capture: str, dtype: str, m: int):
    """The autotuner's tiled configurations that survive its pruning at batch ``m``."""
    from bitcliff.kernels import tuning

    args = {"M": m, "N": 4096, "KP": 4096, "y_ptr": _CpuTensor(), "GROUP_SIZE": GROUP}
    seen = set()
    for cfg in tuning.prune_tiled(tuning.tiled_configs(), args, BITS=bits, GROUP_SIZE=GROUP):
        config = {**cfg.kwargs, "SPLIT_K": min(cfg.kwargs["SPLIT_K"], 2), "num_warps": cfg.num_warps,
                  "num_stages": cfg.num_stages}
        if tuple(config.values()) not in seen:
            seen.add(tuple(config.values()))
            yield kernel("tiled"), constexprs("tiled", bits, capture, dtype, config, GROUP)


def _module_at(ref: str, path: str, name: str):
    """Module ``path`` of the repository as it was at git ``ref``, imported under ``name``."""
    import importlib.util

    root = Path(__file__).resolve().parents[1]
    source = subprocess.run(["git", "show", f"{ref}:{path}"], cwd=root, capture_output=True, text=True,
                            check=True).stdout
    folder = Path(tempfile.mkdtemp(prefix="bitcliff-before-"))
    (folder / f"{name}.py").write_text(source)
    spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def before_candidates(ref: str, schedule: str, bits: int, capture: str, m: int):
    """The kernels and tuning candidates of commit ``ref`` (the single-file ``qmatmul.py`` with the
    GPTQ-ordered planes), for a before/after comparison of the same model."""
    old = _module_at(ref, "bitcliff/kernels/qmatmul.py", "_before_qmatmul")
    old_tuning = _module_at(ref, "bitcliff/kernels/tuning.py", "_before_tuning")
    common = {"BITS": bits, "GROUP_SIZE": GROUP, "CAPTURE": capture, "HAS_BIAS": False, "PERMUTED": False,
              "INTERPRET": False}
    seen = set()
    if schedule == "gemv":
        args = {"M": m, "N": 4096, "KP": 4096, "y_ptr": _CpuTensor()}
        configs = old_tuning.prune_gemv(old_tuning.gemv_configs(), args, BITS=bits, GROUP_SIZE=GROUP)
        fn = old._qmm_gemv_kernel
    else:
        args = {"M": m, "N": 4096, "KP": 4096, "y_ptr": _CpuTensor(), "GROUP_SIZE": GROUP}
        configs = old_tuning.prune_tiled(old_tuning.tiled_configs(), args, BITS=bits, GROUP_SIZE=GROUP)
        fn = old._qmm_tiled_kernel
    for cfg in configs:
        config = {**cfg.kwargs, "SPLIT_K": min(cfg.kwargs["SPLIT_K"], 2), "num_warps": cfg.num_warps,
                  "num_stages": cfg.num_stages}
        if tuple(config.values()) not in seen:
            seen.add(tuple(config.values()))
            yield fn, {**common, **config}


class _CpuTensor:
    device = type("D", (), {"type": "cpu"})()


def _with_split(v: Variant, split: int) -> Variant:
    return Variant(**{**asdict(v), "config": {**v.config, "SPLIT_K": split}})


def best(variants: list[Variant], k: int, n: int, m: int, dev: Device) -> tuple[Variant, dict]:
    """The candidate (and split) with the best prediction for one shape, as the tuner would pick."""
    options = []
    for v in variants:
        splits = (1,) if v.config["SPLIT_K"] == 1 else (2, 4, 8, 16, 32)
        for s in splits:
            if s > 1 and m > 64:
                continue
            cand = _with_split(v, s)
            options.append((predict(cand, k, n, m, dev)["seconds"], id(cand), cand))
    _, _, chosen = min(options, key=lambda x: (x[0], x[1]))
    return chosen, predict(chosen, k, n, m, dev)


def model(bits_list, batches, captures=("none", "stats", "error"), dtype="fp16", dev=Device(),
          before: str | None = None) -> dict:
    from bitcliff.kernels.tuning import GEMV_MAX_M

    rows, variants_out = [], []
    for bits in bits_list:
        for capture in captures:
            gemv_pool = None
            for m in batches:
                if m <= GEMV_MAX_M and gemv_pool is not None:
                    pool = gemv_pool
                else:
                    schedule = "gemv" if m <= GEMV_MAX_M else "tiled"
                    if before:
                        candidates = before_candidates(before, schedule, bits, capture, m)
                    elif schedule == "gemv":
                        candidates = gemv_candidates(bits, capture, dtype)
                    else:
                        candidates = tiled_candidates(bits, capture, dtype, m)
                    pool = [analyse(schedule, kern, cfg, bits, capture, dtype) for kern, cfg in candidates]
                    variants_out += [asdict(v) | {"per_weight": v.per_weight} for v in pool]
                    if schedule == "gemv":
                        gemv_pool = pool
                for k, n in SHAPES:
                    v, p = best(pool, k, n, m, dev)
                    row = {"bits": bits, "capture": capture, "dtype": dtype, "K": k, "N": n, "M": m,
                           "schedule": v.schedule, "config": v.config, "per_weight": round(v.per_weight, 3),
                           "per_weight_by_class": {c: round(x, 3) for c, x in v.per_weight_by_class().items()},
                           **{key: (round(val, 9) if isinstance(val, float) else val) for key, val in p.items()}}
                    if m > GEMV_MAX_M and capture == "none":
                        alt = dequant_then_matmul(k, n, m, bits, dev)
                        row["dequant_matmul"] = {key: (round(val, 9) if isinstance(val, float) else val)
                                                 for key, val in alt.items()}
                    rows.append(row)
    return {"device": asdict(dev), "rates_warp_instr_per_clock_per_sm": RATES, "group": GROUP,
            "triton": triton.__version__, "rows": rows, "variants": variants_out}


def summary(result: dict) -> str:
    """Per width and M (capture none): instructions per weight, median predicted speedup over the
    shapes and its fraction of the byte ceiling; then the capture overheads."""
    lines = [f"{'bits':>4} {'M':>5} {'schedule':8} {'instr/w':>7} {'speedup':>8} {'ceiling':>8} {'fraction':>8}  "
             f"{'dequant+mm':>10}  bound"]
    groups = collections.defaultdict(list)
    for r in result["rows"]:
        groups[(r["bits"], r["M"], r["capture"])].append(r)
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    for (bits, m, capture), rs in sorted(groups.items()):
        if capture != "none":
            continue
        alt = [r["dequant_matmul"]["speedup"] for r in rs if "dequant_matmul" in r]
        lines.append(
            f"{bits:>4} {m:>5} {rs[0]['schedule']:8} {med([r['per_weight'] for r in rs]):7.2f} "
            f"{med([r['speedup'] for r in rs]):8.2f} {med([r['ceiling'] for r in rs]):8.2f} "
            f"{med([r['fraction'] for r in rs]):8.2f}  {med(alt) if alt else float('nan'):10.2f}  "
            f"{collections.Counter(r['bound'] for r in rs).most_common(1)[0][0]}")
    lines.append(f"{'bits':>4} {'M':>5}  stats/none   error/(fp16+none)")
    for (bits, m, capture), rs in sorted(groups.items()):
        if capture != "none":
            continue
        base = {(r["K"], r["N"]): r["seconds"] for r in rs}
        stats = [r["seconds"] / base[(r["K"], r["N"])] - 1 for r in groups.get((bits, m, "stats"), [])]
        err = [r["seconds"] / (base[(r["K"], r["N"])] + fp16_time(r["K"], r["N"], m, Device()))
               for r in groups.get((bits, m, "error"), [])]
        if stats or err:
            lines.append(f"{bits:>4} {m:>5}  {100 * med(stats) if stats else float('nan'):9.1f}%  "
                         f"{med(err) if err else float('nan'):10.2f}")
    return "\n".join(lines)


def markdown_table(before: dict, after: dict) -> str:
    """Per width and batch (capture none, medians over the shapes): instructions per weight and the
    predicted speedup over fp16, before and after, with the byte ceiling and what binds."""
    def medians(result):
        groups = collections.defaultdict(list)
        for r in result["rows"]:
            if r["capture"] == "none":
                groups[(r["bits"], r["M"])].append(r)
        med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
        return {key: {"per_weight": med([r["per_weight"] for r in rs]), "speedup": med([r["speedup"] for r in rs]),
                      "ceiling": med([r["ceiling"] for r in rs]), "fraction": med([r["fraction"] for r in rs]),
                      "schedule": rs[0]["schedule"],
                      "bound": collections.Counter(r["bound"] for r in rs).most_common(1)[0][0]}
                for key, rs in groups.items()}

    b, a = medians(before), medians(after)
    lines = ["| bits | M | schedule | instr/weight before → after | speedup before → after | ceiling | "
             "fraction after | bound after |", "|---|---|---|---|---|---|---|---|"]
    for key in sorted(a):
        x, y = b.get(key), a[key]
        lines.append(f"| W{key[0]} | {key[1]} | {y['schedule']} | "
                     f"{x['per_weight']:.2f} → {y['per_weight']:.2f} | {x['speedup']:.2f} → {y['speedup']:.2f} | "
                     f"{y['ceiling']:.2f} | {y['fraction']:.2f} | {y['bound']} |" if x else "")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    parser.add_argument("--captures", nargs="+", default=["none", "stats", "error"])
    parser.add_argument("--dtype", default="fp16", choices=("fp16", "bf16"))
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--variant", nargs=2, metavar=("SCHEDULE", "BITS"), default=None,
                        help="count one variant (compile_check's configuration) and print it as JSON")
    parser.add_argument("--seed-cache", type=Path, default=None, metavar="DIR",
                        help="write the chosen configurations as a tuning cache for the GPU machine")
    parser.add_argument("--seed-triton", default="3.6.0", help="the GPU machine's Triton (cache file name)")
    parser.add_argument("--before", default=None, metavar="REF",
                        help="model the kernels of git commit REF instead (before/after comparisons)")
    parser.add_argument("--table", nargs=2, type=Path, metavar=("BEFORE", "AFTER"), default=None,
                        help="print the before/after Markdown table of two result files")
    args = parser.parse_args(argv)
    if args.table:
        print(markdown_table(*(json.loads(p.read_text()) for p in args.table)))
        return 0
    if args.variant:
        from bench.compile_check import GEMV, TILED

        schedule, bits = args.variant[0], int(args.variant[1])
        meta = constexprs(schedule, bits, "none", args.dtype, GEMV if schedule == "gemv" else TILED)
        v = analyse(schedule, kernel(schedule), meta, bits, "none", args.dtype)
        print(json.dumps(asdict(v) | {"per_weight": v.per_weight}))
        return 0
    result = model(args.bits, args.batches, tuple(args.captures), args.dtype, before=args.before)
    if args.before:
        result["kernels_from"] = args.before
    result["date"] = dt.date.today().isoformat()
    result["commit"] = _commit()
    result["label"] = "prediction (static model of the sm_90a SASS; no GPU measured these)"
    text = summary(result)
    print(f"PREDICTIONS for {result['device']['name']} from sm_90a SASS (triton {triton.__version__})")
    print(text)
    if args.seed_cache:
        print(f"seeded {seed_cache(result, args.seed_cache, result['device']['name'], args.seed_triton)}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


_TUNED = {"gemv": ("BLOCK_N", "BLOCK_U", "SPLIT_K"), "tiled": ("BLOCK_M", "BLOCK_N", "BLOCK_K", "SPLIT_K", "GROUP_M")}


def seed_cache(result: dict, folder: Path, device: str, triton_version: str) -> Path:
    """The configurations the model chose, as a bitcliff tuning cache for ``device`` and Triton
    ``triton_version`` (``tuning.TuningCache``'s file and keys): a GPU run launches them directly."""
    from bitcliff.kernels.tuning import m_bucket

    entries = {}
    for r in result["rows"]:
        dtype = {"fp16": "float16", "bf16": "bfloat16"}[r["dtype"]]
        key = "|".join(str(v) for v in (r["schedule"], r["bits"], result["group"], dtype, r["capture"],
                                         f"m{m_bucket(r['M'])}", f"n{r['N']}", f"k{r['K']}", 0, 0))
        c = r["config"]
        entries[key] = {**{k: c[k] for k in _TUNED[r["schedule"]]}, "num_warps": c["num_warps"],
                        "num_stages": c["num_stages"]}
    slug = "".join(ch if ch.isalnum() else "_" for ch in device).strip("_")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"autotune-{slug}-triton{triton_version}.json"
    path.write_text(json.dumps(entries, indent=1, sort_keys=True) + "\n")
    return path


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parents[1]).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("BITCLIFF_COMMIT", "unknown")


if __name__ == "__main__":
    sys.exit(main())
