"""The compiled CPU kernel's build: where it cannot be built, the CPU path still works, exactly,
through its plain-torch form, and says so once; the portable build (what a CPU without AVX2 runs)
and the AVX2 build pass the kernel's tests on any machine that runs them; a bad choice of build, or a build whose constants differ
from those Python mirrors, is refused by name."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from bitcliff.kernels import cpu_build
from bitcliff.kernels.cpu_build import BUILD_VARIABLE, build_variant, native_ops, runnable_variants
from bitcliff.numerics import cpu_flags

_WITHOUT_COMPILER = textwrap.dedent("""
    import logging, torch
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    from bitcliff import QuantConfig
    from bitcliff.kernels import cpu, reference
    from bitcliff.quant.qlinear import QuantLinear
    from bitcliff.quant.rtn import quantize_rtn
    layer = QuantLinear.from_quantized(quantize_rtn(torch.randn(40, 96), QuantConfig(bits=3, group_size=32)), 32)
    x = torch.randn(2, 96)
    y, again = layer(x), layer(x)
    ref = reference.dequant_matmul(x, layer.qweight, layer.qzeros, layer.scales, layer.g_idx, 3)
    # fp32 sums in another order: the same bound as test_cpu's, scaled by the output's size
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * max(float(ref.abs().max()), 1.0))
    print("layout", type(layer.kernel_layout()).__name__)
""")


def test_without_a_compiler_the_plain_torch_path_runs_and_says_so_once(tmp_path):
    env = dict(os.environ, CXX=str(tmp_path / "no-such-compiler"), BITCLIFF_CACHE=str(tmp_path / "cache"))
    result = subprocess.run([sys.executable, "-c", _WITHOUT_COMPILER], env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr
    assert "layout ByteLayout" in result.stdout
    assert result.stderr.count("the compiled kernel could not be built") == 1, result.stderr


def test_this_machine_builds_the_kernel_for_its_instruction_set():
    ops = native_ops()
    assert ops is not None, "the compiled CPU kernel did not build here (a compiler and ninja are needed)"
    flags = cpu_flags()
    fastest = "portable"
    if {"avx2", "fma", "f16c"} <= flags:
        fastest = "avx512" if {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"} <= flags else "avx2"
    expected = os.environ.get(BUILD_VARIABLE) or fastest
    assert build_variant() == expected and ops.isa() == expected


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="one core: nothing to run in parallel")
def test_the_kernel_runs_on_every_thread_torch_is_given():
    """A build without OpenMP compiles at::parallel_for to a plain loop: one core, whatever torch's
    thread setting."""
    ops = native_ops()
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert ops.parallel_threads() == 2
        torch.set_num_threads(1)
        assert ops.parallel_threads() == 1
    finally:
        torch.set_num_threads(before)


_NO_OPENMP_COMPILER = """#!/bin/sh
for argument in "$@"; do [ "$argument" = -fopenmp ] && { echo "unsupported option '-fopenmp'" >&2; exit 1; }; done
exec c++ "$@"
"""

_ONE_CORE = textwrap.dedent("""
    import logging, torch
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    from bitcliff.kernels.cpu_build import native_ops
    torch.set_num_threads(2)
    print("threads", native_ops().parallel_threads(), native_ops().isa())
""")


def test_a_compiler_without_openmp_builds_the_kernel_for_one_core_and_says_so(tmp_path):
    compiler = tmp_path / "c++-without-openmp"
    compiler.write_text(_NO_OPENMP_COMPILER)
    compiler.chmod(0o755)
    env = dict(os.environ, CXX=str(compiler), BITCLIFF_CACHE=str(tmp_path / "cache"), BITCLIFF_CPU_BUILD="portable")
    result = subprocess.run([sys.executable, "-c", _ONE_CORE], env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr
    assert "threads 1 portable" in result.stdout
    assert result.stderr.count("did not build with OpenMP") == 1, result.stderr
    assert "could not be built" not in result.stderr


#: The builds this CPU runs besides the one it chooses: each passes the kernel's tests too.
OTHER_BUILDS = [v for v in runnable_variants() if v != runnable_variants()[0]]


@pytest.mark.skipif(BUILD_VARIABLE in os.environ, reason="this is another build's own run")
@pytest.mark.parametrize("variant", OTHER_BUILDS)
def test_the_other_builds_pass_the_kernel_tests(variant):
    """Code paths this machine's own build never runs (the portable build's scalar loops: integer
    decode, 3-bit planes, grouped and slab schedules), through the same tests, in a process that
    builds them."""
    tests = Path(__file__).parent
    env = dict(os.environ, **{BUILD_VARIABLE: variant})
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
         str(tests / "test_cpu.py"), f"{Path(__file__)}::test_this_machine_builds_the_kernel_for_its_instruction_set"],
        env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and " failed" not in result.stdout


@pytest.mark.parametrize("asked,says", [("sse", "choose one of avx512, avx2, portable"), ("", "choose one of")])
def test_a_build_that_does_not_exist_is_refused_by_name(asked, says, monkeypatch):
    monkeypatch.setenv(BUILD_VARIABLE, asked)
    with pytest.raises(ValueError, match=f"{BUILD_VARIABLE}={asked!r}: {says}"):
        build_variant()


@pytest.mark.parametrize("variant,flags", [("avx2", {"sse2"}), ("avx2", {"avx2", "fma"}),
                                           ("avx512", {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl"})])
def test_a_build_the_cpu_cannot_run_is_refused(variant, flags, monkeypatch):
    monkeypatch.setenv(BUILD_VARIABLE, variant)
    monkeypatch.setattr(cpu_build, "cpu_flags", lambda: flags)
    with pytest.raises(ValueError, match=f"{BUILD_VARIABLE}={variant}, but this CPU lacks its instructions"):
        build_variant()


def test_a_build_whose_constants_differ_from_python_is_refused(monkeypatch):
    ops = native_ops()
    cpu_build._check_constants(ops)  # this build agrees
    monkeypatch.setattr(cpu_build, "KERNEL_CONSTANTS", (8, 16319, 256, 5))
    with pytest.raises(RuntimeError, match=r"INT_MAX_ROWS\) = \(8, 16319, 256, 4\).*\(8, 16319, 256, 5\)"):
        cpu_build._check_constants(ops)
