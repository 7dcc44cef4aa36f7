"""The compiled CPU kernel's build: where it cannot be built, the CPU path still works, exactly,
through its plain-torch form, and says so once."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from bitcliff.kernels.cpu_build import build_variant, native_ops
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
    expected = "avx2" if {"avx2", "fma", "f16c"} <= cpu_flags() else "portable"
    assert build_variant() == expected and ops.isa() == expected
