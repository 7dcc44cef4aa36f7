"""Build and load the compiled CPU kernel (``cpu_kernel.cpp``), once per machine, on first use.

The kernel is compiled by ``torch.utils.cpp_extension`` (the machine's C++ compiler and ninja)
into bitcliff's cache and registered as the ``torch.ops.bitcliff_cpu`` operators.  It is built
for the instruction sets the CPU has: AVX-512 (F, BW, VL) with VNNI, which adds the many-rows
integer product (``gemm_int``: ``vpdpwssd``, 32 int16 products per instruction); else AVX2 with
FMA and F16C (every x86-64 CPU since about 2015); else a portable scalar build.  The AVX-512 build
also decodes one row on zmm registers with ``vpdpbusd`` (``gemv_int_pair``; a 256-bit AVX-VNNI form
measured no faster on a Xeon while the kernel ran on one core).  The flags are fixed,
never ``-march=native``, so that two machines with the same build run the same machine code and
give the same bytes.  ``BITCLIFF_CPU_BUILD=portable`` chooses the portable build on any machine
(the suite runs the kernel's tests through every build the machine can run).

Where no compiler (or no ninja) is found, or the build fails, :func:`native_ops` returns
``None`` and the CPU path falls back to its plain-torch form (``cpu.py``), slower but exact;
either way the path taken is logged once.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from pathlib import Path

import torch

from bitcliff.kernels.cpu_packed import KERNEL_CONSTANTS
from bitcliff.numerics import cpu_flags

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_kernel.cpp")
#: Compiler flags per build; contraction off so the scalar code rounds the same on every machine.
FLAGS = {
    "avx512": ["-O3", "-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni",
               "-ffp-contract=off"],
    "avx2": ["-O3", "-mavx2", "-mfma", "-mf16c", "-ffp-contract=off"],
    "portable": ["-O3", "-ffp-contract=off"],
}

#: Flags every build adds: without OpenMP, ``at::parallel_for`` in the kernel compiles to a plain
#: loop, and the kernel would run on one core whatever ``torch.set_num_threads`` says.  The build
#: links the ``libgomp.so.1`` torch itself loads, so the two share one thread pool.
OPENMP = ["-fopenmp"]

_lock = threading.Lock()
_state: dict = {}


#: Environment variable that chooses the build instead of the CPU's flags (``avx512``, ``avx2``,
#: ``portable``):
#: the portable build is what a CPU without AVX2 runs, and the suite checks it on any machine.
BUILD_VARIABLE = "BITCLIFF_CPU_BUILD"


def runnable_variants() -> list[str]:
    """The builds this CPU runs, fastest first (the order of :data:`FLAGS`)."""
    flags = cpu_flags()
    runs = {"portable"}
    if {"avx2", "fma", "f16c"} <= flags:
        runs.add("avx2")
        if {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"} <= flags:
            runs.add("avx512")
    return [variant for variant in FLAGS if variant in runs]


def build_variant() -> str:
    """The fastest build this CPU runs (``avx512``, ``avx2`` or ``portable``); :data:`BUILD_VARIABLE`
    overrides it.

    Raises:
        ValueError: the variable names no build, or one the CPU cannot run.
    """
    runs = runnable_variants()
    asked = os.environ.get(BUILD_VARIABLE)
    if asked is None:
        return runs[0]
    if asked not in FLAGS:
        raise ValueError(f"{BUILD_VARIABLE}={asked!r}: choose one of {', '.join(FLAGS)}")
    if asked not in runs:
        raise ValueError(f"{BUILD_VARIABLE}={asked}, but this CPU lacks its instructions ({' '.join(FLAGS[asked])})")
    return asked


def _build(variant: str) -> object | None:
    """Build with OpenMP, or, where the compiler has none (Apple's clang, say), without: the kernel
    then runs on one core, which is still faster than the plain-torch path.  Only the compile and
    load are retried; a loaded build that fails its checks is refused as it is."""
    try:
        _compile_and_load(variant, OPENMP)
    except Exception as error:  # noqa: BLE001 (any failure: try the plainer build before giving up)
        _compile_and_load(variant, [])  # fails too where there is no compiler at all: native_ops says so
        logger.warning("CPU dequant-matmul: the kernel did not build with OpenMP (%s); built without it, it "
                       "runs on one core", _first_line(error))
    _register_fakes()
    _check_constants(torch.ops.bitcliff_cpu)
    return torch.ops.bitcliff_cpu


def _compile_and_load(variant: str, threading_flags: list[str]) -> None:
    """Compile the kernel with ``variant``'s flags and ``threading_flags`` (once per machine: the
    cache keeps it) and register its operators."""
    from torch.utils import cpp_extension  # noqa: PLC0415 (imports setuptools: only when building)

    from bitcliff.storage import cache_root  # noqa: PLC0415

    flags = FLAGS[variant] + threading_flags
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(flags).encode() + torch.__version__.encode())
    name = f"bitcliff_cpu_{variant}_{digest.hexdigest()[:12]}"
    folder = cache_root() / "kernels" / name
    folder.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(
        name=name, sources=[str(SOURCE)], extra_cflags=flags, extra_ldflags=threading_flags,
        build_directory=str(folder), is_python_module=False, verbose=False,
    )


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _check_constants(ops) -> None:
    """Refuse a build whose layout and rounding constants differ from those Python mirrors."""
    built = tuple(ops.constants())
    if built != KERNEL_CONSTANTS:
        raise RuntimeError(f"{SOURCE.name} has constants (BLOCK, ACT_LEVELS, INT_MAX_POSITIONS, INT_MAX_ROWS) = "
                           f"{built}, cpu_packed.py {KERNEL_CONSTANTS}; make them agree")


def _register_fakes() -> None:
    """Shapes of the operators' outputs, so that ``torch.compile`` traces through them."""
    @torch.library.register_fake("bitcliff_cpu::linear")
    def _(x, words, scales, zeros, columns, bias, bits, in_features, out_features, gemv_max_rows, slab_bytes,
          integer_activations):
        return x.new_empty((*x.shape[:-1], out_features))

    @torch.library.register_fake("bitcliff_cpu::linear_bf16")
    def _(x, weight):
        return x.new_empty((*x.shape[:-1], weight.shape[0]))


def native_ops():
    """``torch.ops.bitcliff_cpu`` (built on the first call), or ``None`` where it cannot be built."""
    if "ops" in _state:  # every forward asks: no lock once decided
        return _state["ops"]
    with _lock:
        if "ops" not in _state:
            variant = build_variant()  # a bad BITCLIFF_CPU_BUILD is the user's to fix, not a fallback
            try:
                _state["ops"] = _build(variant)
                logger.info("CPU dequant-matmul: compiled kernel (%s)", _state["ops"].isa())
            except Exception as error:  # no compiler, no ninja, a failed build: all mean "use the fallback"
                _state["ops"] = None
                logger.warning("CPU dequant-matmul: the compiled kernel could not be built (%s); using the "
                               "plain-torch path, which is exact but slower", _first_line(error))
        return _state["ops"]
