"""The GPU's decode program, executed bit for bit by numpy, against the layout's definition.

``decode.program`` is what the Triton kernels run as inline PTX on CUDA; the interpreter cannot run
PTX, so these tests execute the same instruction list with numpy (one rounding per ``fma2``, as
the hardware) and check it exhaustively: every 16-bit pattern in each half of each word, every
zero point, every pair of codes, against the codes the kernel layout defines.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bitcliff.kernels import decode
from bitcliff.kernels.layout import code_bit, width

DTYPES = ("fp16", "bf16")
PATTERNS = np.arange(1 << 16, dtype=np.uint32)


def _rotl16(u: np.ndarray, r: int) -> np.ndarray:
    return ((u << r) | (u >> (16 - r))) & 0xFFFF


def _words(rotation: int) -> np.ndarray:
    """Every 16-bit pattern in the low half, a rotation of it in the high half."""
    return PATTERNS | (_rotl16(PATTERNS, rotation) << 16)


def _field(words: np.ndarray, position: int, width: int) -> np.ndarray:
    return (words >> code_bit(position, width)) & ((1 << width) - 1)


def _unit_codes(words: dict, bits: int, pair: int, half: int) -> np.ndarray:
    """Code ``2 * pair + half`` of the unit, as the kernel layout stores it."""
    spec = width(bits)
    position = 2 * pair + half
    code = _field(words[f"w{position // spec.codes_per_word}"], position % spec.codes_per_word, spec.lo)
    if spec.hi:
        code = code | (_field(words["h"], position, spec.hi) << spec.lo)
    return code


def _random_words(gen, n):
    return {w: gen.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32) for w in decode.WORDS}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_every_pair_decodes_exactly(bits, dtype):
    prog = decode.program(bits, dtype)
    fmt = decode.FORMATS[dtype]
    zeros = np.arange(2**bits, dtype=np.uint32)[:, None]  # [Z, 1] against [65536] words
    x = [np.zeros((1, 1 << 16), dtype=np.uint32) for _ in range(decode.N_X)]
    # Every word holds every 16-bit pattern in each half, rotated differently per word; two
    # rotations of the high word give every (low bits, high bit) combination of every code.
    for hi_rotation in (8, 9):
        words = {w: _words(3 + 4 * i)[None, :] for i, w in enumerate(decode.WORDS[:-1])}
        words["h"] = _words(hi_rotation)[None, :]
        regs: dict = {}
        prog.emulate(words, x, zeros, registers=regs)
        for j in range(decode.N_X):
            got = regs[prog.dequantized(j)]
            for half in (0, 1):
                expected = (_unit_codes(words, bits, j, half).astype(np.float64) - zeros) / 16
                value = decode._to_float(got >> (16 * half), fmt)
                np.testing.assert_array_equal(value, expected, err_msg=f"pair {j}, half {half}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_zero_constants_are_exact_and_linear(bits, dtype):
    prog = decode.program(bits, dtype)
    fmt = decode.FORMATS[dtype]
    z = np.arange(2**bits)
    for c, operand in zip(prog.constants, prog.zero_constants(z)):
        for half in (0, 1):
            np.testing.assert_array_equal(decode._to_float(operand >> (16 * half), fmt), -(c.base + z / 16))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_half_precision_sums_stay_within_the_kernel_tolerance(bits, dtype):
    """The products and their half-precision partial sums, on random data, against float64."""
    gen = np.random.default_rng(bits)
    n = 20000
    torch_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    words = _random_words(gen, n)
    zeros = gen.integers(0, 2**bits, n).astype(np.uint32)
    xs = torch.randn(n, 32, generator=torch.Generator().manual_seed(bits)).to(torch_dtype)
    pairs = xs.view(torch.int32).numpy().astype(np.uint32)  # [n, 16]: positions (2j, 2j+1)
    got = prog_out = decode.program(bits, dtype).emulate(words, [pairs[:, j] for j in range(16)], zeros)
    ref = np.zeros(n)  # float64, from the layout's codes
    xf = xs.double().numpy()
    for j in range(16):
        for half in (0, 1):
            code = _unit_codes(words, bits, j, half)
            ref += (code.astype(np.float64) - zeros) / 16 * xf[:, 2 * j + half]
    assert np.isfinite(prog_out).all()
    scale = np.sqrt(np.mean(ref**2))
    rel = np.sqrt(np.mean((got - ref) ** 2)) / scale
    # Well inside the kernel tolerances (tests/kernels/test_qmatmul.py: 2e-3 fp16, 1.6e-2 bf16).
    assert rel < {"fp16": 1e-3, "bf16": 8e-3}[dtype], rel


def test_ptx_is_one_instruction_per_step():
    prog = decode.program(4, "fp16")
    body = [line for line in prog.ptx.splitlines() if line.endswith(";") and not line.startswith(".reg")]
    assert sum("lop3" in line for line in body) == 16  # 32 codes, two per instruction
    assert sum("fma.rn.f16x2" in line for line in body) == 32
    assert sum("cvt.f32.f16" in line for line in body) == 2  # one chain per unit
    assert prog.constraints.count("r") == len(decode.WORDS) + decode.N_X + decode.N_CONST


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_word_program_gives_scaled_weights_in_k_order(bits, dtype):
    """The tiled kernel's program: every pattern of a word, every zero point, random scales; each
    weight must be ``s * (q - z)`` rounded once to the dtype (as the reference rounds it)."""
    prog = decode.word_program(bits, dtype)
    spec = width(bits)
    per_word = spec.codes_per_word
    torch_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    scales = (torch.rand(2**bits, 1, generator=torch.Generator().manual_seed(bits)) * 0.02 + 1e-3).to(torch_dtype)
    scale_bits = scales.view(torch.int16).numpy().astype(np.uint32) & 0xFFFF
    zeros = np.arange(2**bits, dtype=np.uint32)[:, None]
    for hi_rotation in (8, 9):
        words = {"w": _words(3)[None, :], "h": _words(hi_rotation)[None, :]}
        got = prog.emulate(words, zeros=zeros, scale=scale_bits)  # [Z, 65536, codes]
        assert got.shape[-1] == per_word
        for position in range(per_word):
            code = _field(words["w"], position, spec.lo)
            if spec.hi:
                code = code | (_field(words["h"], position, spec.hi) << spec.lo)
            exact = torch.from_numpy((code.astype(np.float64) - zeros) * scales.double().numpy())
            expected = exact.to(torch_dtype).view(torch.int16).numpy().astype(np.uint32) & 0xFFFF
            np.testing.assert_array_equal(got[..., position], expected, err_msg=f"position {position}")


def _worst_case_sum(bits: int, dtype: str, x: float) -> tuple[float, float]:
    """A unit whose 32 codes all sit at the largest distance from their zero point (every plane bit
    set, zero 0) against 32 activations ``x`` of one sign: the program's fp32 result and the exact
    sum ``32 * x * (2**bits - 1) / 16``."""
    fmt = decode.FORMATS[dtype]
    prog = decode.program(bits, dtype)
    words = {w: np.array([0xFFFFFFFF], dtype=np.uint32) for w in decode.WORDS}
    half = int(decode._round(np.array([x]), fmt)[0])
    pairs = [np.array([half | (half << 16)], dtype=np.uint32)] * decode.N_X
    with np.errstate(over="ignore"):
        got = prog.emulate(words, pairs, np.array([0], dtype=np.uint32))[0]
    return float(got), 32 * float(decode._to_float(np.array([half]), fmt)[0]) * (2**bits - 1) / 16


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_fp16_sums_overflow_just_beyond_the_documented_activation_range(bits):
    """Each product (q - z) / 16 * x is at most |x|, but a chain of sixteen in fp16 is not: the sum
    stays finite up to ``max_abs_activation`` (about 4367 / 9358 / 21835 at 4 / 3 / 2 bits) and
    overflows at the next fp16 value above it, where the exact (fp32) sum is an ordinary number."""
    limit = decode.program(bits, "fp16").max_abs_activation
    assert limit == pytest.approx(65504 / (2**bits - 1))
    below = float(np.float16(limit))
    below = below if below <= limit else float(np.nextafter(np.float16(limit), np.float16(0)))
    above = float(np.nextafter(np.float16(below), np.float16(np.inf)))
    got, exact = _worst_case_sum(bits, "fp16", below)
    assert np.isfinite(got) and got == pytest.approx(exact, rel=1e-3)
    got, exact = _worst_case_sum(bits, "fp16", above)
    assert np.isinf(got) and np.isfinite(exact)
    assert above > limit  # the documented bound is exactly where overflow begins


def test_bf16_sums_have_no_such_limit_at_any_real_activation():
    """bf16 sums chains of four over fp32's exponent range: the worst case at fp16's largest value
    (far beyond fp16's bound) is finite and close to the exact sum."""
    assert decode.program(4, "bf16").max_abs_activation > 1e37
    got, exact = _worst_case_sum(4, "bf16", 65504.0)
    assert np.isfinite(got) and got == pytest.approx(exact, rel=2e-2)
