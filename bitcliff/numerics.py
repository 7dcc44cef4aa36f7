"""The CPU code paths the bitcliff commands pin, so that a command gives the same bytes on every
x86 machine and with any number of threads.

PyTorch picks its CPU kernels by the instruction set of the machine (ATen's vectorized kernels:
AVX2 or AVX-512) and Intel MKL picks its own (and, unpinned, may split a reduction differently
with more threads).  Each choice rounds differently, and GPTQ amplifies one different rounding
into different codes: on one machine, GPTQ W3 g64 of the embedded model (32 windows) gave four
different checkpoints for the four combinations of ATen on AVX2 or AVX-512 and MKL unpinned or
pinned (``docs/architecture.md``, section 4).  Two machines with different CPUs differ the same way.

:func:`pin` asks both for their AVX2 paths (``ATEN_CPU_CAPABILITY=avx2``, and MKL's conditional
numerical reproducibility ``MKL_CBWR=AVX2,STRICT``, whose strict mode also fixes the reduction
order whatever the thread count).  Every x86-64 CPU since 2015 has AVX2, and on the 2-core
AVX-512 machine the pinned paths cost nothing measurable (GPTQ and evaluation, median wall-time
ratio 0.99).  Both are environment variables that each library reads once, at its first
operation (not when torch is imported): ATen when it first picks a kernel, MKL at its first
call.  A variable the user set is left alone, and :func:`state` reports ATen's kernels in effect
and MKL's setting (result files record it).

Who pins:

* the ``bitcliff`` command and ``python -m bitcliff`` (:func:`bitcliff.cli.main`), first thing,
  before anything computes; the processes a command starts inherit the variables (torchrun's
  ranks for ``--nproc``, the worker processes of ``bitcliff cliff``);
* the test suite, in its ``conftest.py``, and the benchmarks (``bench/__init__.py``);
* not ``import bitcliff``: a library leaves its host process alone, so importing bitcliff or any
  of its modules changes no environment variable, thread count or numerics mode, and runs no CPU
  operation.  A program that wants the commands' bytes from the Python API pins itself, before
  its first tensor operation::

      import bitcliff

      bitcliff.numerics.pin()  # before torch computes anything in this process

On GPUs bit identity across devices and runs is not promised (see ``docs/architecture.md``):
CPU and GPU results agree within the stated tolerances.
"""

from __future__ import annotations

import os
import platform

#: What :func:`pin` sets, unless the environment already says otherwise.
PINNED = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2,STRICT"}


def _cpuinfo_field(name: str) -> str | None:
    """The first ``name`` line of ``/proc/cpuinfo`` (None off x86 or where it cannot be read)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.split(":", 1)[0].strip() == name:
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from ``/proc/cpuinfo`` (empty off x86 or where it cannot be read)."""
    return frozenset((_cpuinfo_field("flags") or "").split())


def cpu_model() -> str:
    """The CPU's model name (``Intel(R) Xeon(R) Processor``), for the records of a measurement."""
    return _cpuinfo_field("model name") or platform.processor() or platform.machine()


def _has_avx2() -> bool:
    return {"avx2", "fma"} <= cpu_flags()


def pin() -> dict[str, str]:
    """Pin ATen's and MKL's CPU paths to AVX2, for this process and the processes it starts
    afterwards; returns the variables it set.

    Sets nothing where the CPU lacks AVX2 (the paths do not exist there) and leaves a variable
    the user set alone.  Call it before this process's first tensor operation on the CPU
    (importing torch or bitcliff first is fine): both libraries read the setting then, once, and
    a call after that changes the child processes only, not this one.
    """
    if not _has_avx2():
        return {}
    chosen = {key: value for key, value in PINNED.items() if key not in os.environ}
    os.environ.update(chosen)
    return chosen


def state() -> dict[str, str | None]:
    """The CPU paths in effect: ATen's capability and MKL's branch setting (for result files)."""
    import torch

    return {"aten_cpu_capability": torch.backends.cpu.get_cpu_capability(), "mkl_cbwr": os.environ.get("MKL_CBWR")}
