"""How the GPU turns packed codes into half-precision weights: two codes per instruction.

A 4-bit code OR-ed into the mantissa of the fp16 number 1024 (bits ``0x6400``) reads as
``1024 + code``: one ``LOP3`` (``(word & mask) | magic``) decodes *two* codes at once when the
word holds one code in each 16-bit half, and one ``HFMA2`` then removes the magic number and the
zero point from both: ``(1024 + q) / 16 - (64 + z / 16) = (q - z) / 16``, exactly.  A field that
sits higher in the mantissa decodes as ``1024 + 2**o * q``; the same ``HFMA2`` with ``2**-o / 16``
undoes that too, so several fields of a word decode without shifting it.  This is how the fastest
CUDA kernels (FasterTransformer, Marlin) dequantize; here it is written for every bit width from
one description.

The kernel layout (``layout.py``) stores each plane word with the even codes of its span in the
low half and the odd codes in the high half, so the two codes one instruction decodes are
neighbours along K and multiply one ``half2`` of activations, read straight from memory.

A **decode program** describes how the 32 codes of one column in one unit (the layout's packing
unit) become their contribution ``sum_k (q_k - z) / 16 * x_k`` to the output, as fp32:

* extract pairs of codes from the plane words (``shift``, ``extract``);
* dequantize each pair (``fma2`` with the pair's zero constant ``-(magic / 2**o / 16 + z/16)``);
* for 3 bits, add the high plane's bit ``4 * b / 16`` with a second ``fma2`` on the same value;
* multiply by the activation pair and sum in half precision (``fma2``), ``chain`` pairs at a
  time, then convert to fp32 and add (``to_f32_add``).

The division by 16 keeps every *product* at most ``|x|`` in size (``(q - z) * x`` alone would
overflow fp16 from ``|x|`` of about 4367 at 4 bits); the kernel multiplies the scale by 16.  The
*sum* of a chain is not so bounded: ``chain`` products in half precision (16 in fp16, 4 in bf16)
reach ``chain * max|q - z| / 16 * max|x|``, so in fp16 a unit's sum can overflow to ``inf`` once
``max|x|`` exceeds ``65504 * 16 / (chain * max|q - z|)``: about 4367 at 4 bits, 9358 at 3 bits and
21835 at 2 bits (:attr:`DecodeProgram.max_abs_activation`; ``tests/kernels/test_decode.py`` shows
both sides of the bound).  Nothing checks this at run time (it would cost a reduction over ``x`` and
a synchronisation per launch): fp16 activations beyond it need bf16 or the portable path.  bf16's
bound (about 9e37 at 4 bits) lies beyond any real activation.

The same program is printed as PTX for ``tl.inline_asm_elementwise`` (:attr:`DecodeProgram.ptx`)
and executed by numpy (:meth:`DecodeProgram.emulate`), so the exact bit sequence the GPU runs is
tested on the CPU (``tests/kernels/test_decode.py``, exhaustively over every 16-bit word).

Operands of the assembly, in order: ``$0`` the fp32 result, ``$1`` the fp32 sum so far,
``$2..$5`` the unit's low-plane words ``w0..w3`` (4 bits: four; 2 and 3 bits: two, the rest
unused), ``$6`` the high-plane word ``h`` (3 bits; unused otherwise), ``$7..$22`` the sixteen
activation pairs ``x0..x15`` (int32 holding two halves: positions ``2j, 2j+1`` of the unit), and
``$23..$27`` the zero constants ``c0..c4`` (half2 as int32, :meth:`DecodeProgram.zero_constants`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from bitcliff.kernels.layout import width

N_WORDS = 4  # low-plane word operands (the most any width has per unit)
N_X = 16  # activation pairs per program: one 32-code unit
N_CONST = 5  # zero-constant operands of a program (unused ones are ignored)
WORDS = tuple(f"w{i}" for i in range(N_WORDS)) + ("h",)


@dataclass(frozen=True)
class HalfFormat:
    """A 16-bit float format as the decode uses it."""

    name: str  # PTX type suffix
    exponent_bias: int
    mantissa_bits: int

    @property
    def magic(self) -> float:
        """The number whose mantissa receives the codes (1024 in fp16, 128 in bf16)."""
        return float(2 ** self.mantissa_bits)

    def bits_of(self, value: float) -> int:
        """The 16-bit pattern of ``value``, which must be exactly representable."""
        pattern = int(_round(np.array([value]), self)[0])
        if _to_float(np.array([pattern], dtype=np.uint32), self)[0] != value:
            raise ValueError(f"{value!r} is not exactly representable in {self.name}")
        return pattern


FORMATS = {"fp16": HalfFormat("f16", 15, 10), "bf16": HalfFormat("bf16", 127, 7)}


def _to_float(halves: np.ndarray, fmt: HalfFormat) -> np.ndarray:
    """uint32 array of 16-bit patterns -> float64 values."""
    h = halves.astype(np.uint32) & 0xFFFF
    if fmt.name == "f16":
        return h.astype(np.uint16).view(np.float16).astype(np.float64)
    return (h << 16).astype(np.uint32).view(np.float32).astype(np.float64)


def _round(values: np.ndarray, fmt: HalfFormat) -> np.ndarray:
    """float64 -> 16-bit patterns (uint32), round to nearest even."""
    if fmt.name == "f16":
        return values.astype(np.float16).view(np.uint16).astype(np.uint32)
    f32 = values.astype(np.float32).view(np.uint32).astype(np.uint64)
    rounded = (f32 + 0x7FFF + ((f32 >> 16) & 1)) >> 16  # round half to even on the dropped bits
    return (rounded & 0xFFFF).astype(np.uint32)


def _pair(lo: int, hi: int | None = None) -> int:
    return (lo & 0xFFFF) | (((lo if hi is None else hi) & 0xFFFF) << 16)


# ---------------------------------------------------------------------------------------------
# The program: a few instruction kinds, printed as PTX or executed by numpy
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Op:
    """One instruction: ``kind`` and register names (``imm:<int>`` for an immediate pair)."""

    kind: str  # "shift" (amount > 0 right, < 0 left), "extract", "fma2", "to_f32_add"
    dst: str
    srcs: tuple
    amount: int = 0


@dataclass(frozen=True)
class ZeroConstant:
    """Operand ``c<index>``: the half2 ``-(base + z / 16)`` as ``base_bits + z * step`` (both halves)."""

    base: float
    base_bits: int
    step: int


@dataclass(frozen=True)
class DecodeProgram:
    bits: int
    dtype: str
    kind: str  # "unit": the gemv's dot product of a unit; "word": one word's weights (tiled)
    ops: tuple[Op, ...]
    constants: tuple[ZeroConstant, ...]
    chain: int  # products summed in half precision before each conversion to fp32

    # -- PTX -----------------------------------------------------------------------------------

    @property
    def operands(self) -> list[str]:
        """Input operand names in order (the outputs come first: see :attr:`constraints`)."""
        if self.kind == "unit":
            return ["acc_in", *WORDS, *(f"x{j}" for j in range(N_X)), *(f"c{i}" for i in range(N_CONST))]
        return ["w", "h", *(f"c{i}" for i in range(N_CONST)), "s"]

    @property
    def n_outputs(self) -> int:
        return 1 if self.kind == "unit" else 2 * sum(op.kind == "output" for op in self.ops)

    @property
    def constraints(self) -> str:
        if self.kind == "unit":
            return ",".join(["=f", "f"] + ["r"] * (len(self.operands) - 1))
        return ",".join(["=h"] * self.n_outputs + ["r"] * len(self.operands))

    @functools.cached_property
    def ptx(self) -> str:
        fmt = FORMATS[self.dtype]
        names = {name: f"${self.n_outputs + i}" for i, name in enumerate(self.operands)}
        temps = sorted({op.dst for op in self.ops if op.kind != "output"} - set(names) - {"acc"})
        # Half-precision arithmetic takes no immediate operands: constants go through registers
        # (ptxas folds them back into the HFMA2 encoding).
        constants = sorted({x for op in self.ops if op.kind == "fma2" for x in op.srcs if x.startswith("imm:")})
        for i, c in enumerate(constants):
            names[c] = f"k{i}"
        lines = ["{", f".reg .b32 {', '.join(temps + [names[c] for c in constants])};"]
        if self.kind == "unit":
            lines += [".reg .b16 lo16, hi16;", ".reg .f32 acc, flo, fhi;", "mov.f32 acc, $1;"]
        lines += [f"mov.b32 {names[c]}, 0x{int(c[4:]):08X};" for c in constants]

        def reg(name):
            if name in names:
                return names[name]
            if name.startswith("imm:"):
                return f"0x{int(name[4:]):08X}"
            return name

        n_out = 0
        for op in self.ops:
            d, s = reg(op.dst), [reg(x) for x in op.srcs]
            if op.kind == "shift":
                lines.append(f"{'shr' if op.amount > 0 else 'shl'}.b32 {d}, {s[0]}, {abs(op.amount)};")
            elif op.kind == "extract":  # (a & mask) | magic: LUT 0xEA = (a & b) | c
                lines.append(f"lop3.b32 {d}, {s[0]}, {s[1]}, {s[2]}, 0xEA;")
            elif op.kind == "fma2":
                lines.append(f"fma.rn.{fmt.name}x2 {d}, {s[0]}, {s[1]}, {s[2]};")
            elif op.kind == "to_f32_add":
                if fmt.name == "f16":
                    lines += [f"mov.b32 {{lo16, hi16}}, {s[0]};", "cvt.f32.f16 flo, lo16;",
                              "cvt.f32.f16 fhi, hi16;"]
                else:  # a bf16 is the high half of the fp32 with the same value
                    lines += [f"shl.b32 flo, {s[0]}, 16;", f"and.b32 fhi, {s[0]}, 0xFFFF0000;"]
                lines += ["add.f32 acc, acc, flo;", "add.f32 acc, acc, fhi;"]
            elif op.kind == "output":  # the pair's two halves: the next two output operands
                lines.append(f"mov.b32 {{${n_out}, ${n_out + 1}}}, {s[0]};")
                n_out += 2
            else:
                raise AssertionError(op.kind)
        if self.kind == "unit":
            lines.append("mov.f32 $0, acc;")
        lines.append("}")
        return "\n".join(lines)

    @property
    def max_abs_activation(self) -> float:
        """(unit programs) The largest ``max|x|`` for which no half-precision sum of a chain can
        exceed the format's largest finite value, whatever the codes and zero points: beyond it a
        unit's fp16 sum may overflow (see the module docstring)."""
        if self.kind != "unit":
            raise ValueError("only the gemv's unit programs sum in half precision")
        fmt = FORMATS[self.dtype]
        largest = (2.0 - 2.0 ** -fmt.mantissa_bits) * 2.0 ** (2 ** (15 - fmt.mantissa_bits) - 2 - fmt.exponent_bias)
        return largest * 16 / (self.chain * (2**self.bits - 1))

    # -- constants -----------------------------------------------------------------------------

    def zero_constants(self, zeros: np.ndarray) -> list[np.ndarray]:
        """The ``c`` operands for integer zero points (numpy; the kernel computes the same with
        one integer multiply-add each: ``z * (step * 0x10001) + base_bits * 0x10001``)."""
        z = zeros.astype(np.uint64)
        out = [((c.base_bits + z * c.step) * 0x10001) & 0xFFFFFFFF for c in self.constants]
        while len(out) < N_CONST:
            out.append(np.zeros_like(z))
        return [o.astype(np.uint32) for o in out]

    @functools.cached_property
    def zero_constants_ptx(self) -> str:
        """PTX for ``tl.inline_asm_elementwise``: ``$0..$4`` the ``c`` operands from ``$5 = z``."""
        lines = []
        for i in range(N_CONST):
            if i < len(self.constants):
                c = self.constants[i]
                lines.append(f"mad.lo.u32 ${i}, $5, {c.step * 0x10001}, {c.base_bits * 0x10001};")
            else:
                lines.append(f"mov.b32 ${i}, 0;")
        return "\n".join(lines)

    # -- numpy execution -----------------------------------------------------------------------

    def dequantized(self, j: int) -> str:
        """The register holding pair ``j``'s dequantized ``(q - z) / 16`` (the factor of its product)."""
        return next(op.srcs[0] for op in self.ops if op.kind == "fma2" and op.srcs[1] == f"x{j}")

    def emulate(self, words: dict, x_pairs=(), zeros=0, acc_in=None, registers: dict | None = None,
                scale=None) -> np.ndarray:
        """Run the program on arrays (any common shape), as the GPU would.

        Args:
            words: uint32 plane words by operand name (unit: ``w0``..``w3``, ``h``; word: ``w``,
                ``h``); missing ones are 0.
            x_pairs: (unit) sixteen uint32 arrays of two half-precision activations each.
            zeros: the integer zero points.
            acc_in: (unit) fp32 sums so far (zeros if None).
            registers: if given, filled with every register's final value (uint32 arrays).
            scale: (word) the scales, as 16-bit patterns of the activation dtype.
        Returns:
            unit: float32 ``acc_in + sum_k (q_k - z) / 16 * x_k`` with the program's roundings
            (each half-precision chain converted and added to ``acc_in`` in order);
            word: uint32 ``[..., codes]``, the 16-bit patterns of ``s * (q - z)`` in K order.
        """
        fmt = FORMATS[self.dtype]
        names = list(WORDS) if self.kind == "unit" else ["w", "h"]
        shape = np.broadcast_shapes(*(np.shape(w) for w in words.values()), np.shape(zeros))
        regs = {w: np.broadcast_to(np.asarray(words.get(w, 0), dtype=np.uint32), shape) for w in names}
        a = regs[names[0]]
        regs.update({f"x{j}": np.asarray(x, dtype=np.uint32) for j, x in enumerate(x_pairs)})
        regs.update({f"c{i}": c for i, c in enumerate(self.zero_constants(np.asarray(zeros)))})
        if scale is not None:
            sixteen = _round(_to_float(np.asarray(scale, dtype=np.uint32), fmt) * 16, fmt)  # 16 s, exact
            regs["s"] = np.broadcast_to(sixteen | (sixteen << 16), shape).astype(np.uint32)
        acc = np.zeros(a.shape, dtype=np.float32) if acc_in is None else np.asarray(acc_in, dtype=np.float32)
        acc = np.broadcast_to(acc, a.shape).copy()
        outputs = []

        def value(name):
            if name.startswith("imm:"):
                return np.full(a.shape, int(name[4:]), dtype=np.uint32)
            return regs[name]

        for op in self.ops:
            s = [value(x) for x in op.srcs]
            if op.kind == "shift":
                v = s[0].astype(np.uint64)
                out = (v >> op.amount) if op.amount > 0 else (v << -op.amount)
                regs[op.dst] = (out & 0xFFFFFFFF).astype(np.uint32)
            elif op.kind == "extract":
                regs[op.dst] = (s[0] & s[1]) | s[2]
            elif op.kind == "fma2":
                halves = []
                for shift in (0, 16):
                    fa, fb, fc = (_to_float(v >> shift, fmt) for v in s)
                    halves.append(_round(fa * fb + fc, fmt))  # one rounding, as fma
                regs[op.dst] = (halves[0] | (halves[1] << 16)).astype(np.uint32)
            elif op.kind == "to_f32_add":
                for shift in (0, 16):
                    acc = (acc + _to_float(s[0] >> shift, fmt).astype(np.float32)).astype(np.float32)
            elif op.kind == "output":
                outputs += [s[0] & 0xFFFF, s[0] >> 16]
        if registers is not None:
            registers.update(regs)
        return acc if self.kind == "unit" else np.stack(outputs, axis=-1)


# ---------------------------------------------------------------------------------------------
# Building the program for a width and an activation dtype
# ---------------------------------------------------------------------------------------------


def _fields(width: int, count: int, fmt: HalfFormat, lowest: int = 0):
    """(shift, offset) for fields ``0..count-1`` of a plane word (field m at bit ``width*m`` of each
    half), each brought to an offset in ``[lowest, mantissa - width]`` by as few shifts as possible."""
    top = fmt.mantissa_bits - width
    shift, out = None, []
    for m in range(count):
        bit = width * m
        if shift is None or not lowest <= bit - shift <= top:
            shift = bit - lowest
        out.append((shift, bit - shift))
    return out


class _Builder:
    """Appends the instructions that dequantize pairs of codes; shares shifts and zero constants."""

    def __init__(self, bits: int, dtype: str):
        self.bits, self.fmt = bits, FORMATS[dtype]
        self.magic_pair = _pair(self.fmt.bits_of(self.fmt.magic))
        spec = width(bits)
        self.lo_width, self.has_hi = spec.lo, spec.hi > 0
        if spec.hi > 1:
            raise ValueError(f"{bits}-bit codes: the decode program handles a high plane of one bit")
        self.per_word = 32 // self.lo_width // 2  # pairs per low-plane word
        self.lo_fields = _fields(self.lo_width, self.per_word, self.fmt)
        # A high plane, fp16: the high bit is added by the fma2 that multiplies it, onto the low part
        # minus magic * 2**(lo-j-4) (folded into the zero constant); that is exact only for high
        # fields at offsets j >= lo + 1, so the high word is shifted to put them there, j tied to the
        # low offset o so that one constant serves each (o, j).  bf16 adds the parts with one more fma2.
        self.merge = self.has_hi and self.fmt.name == "f16"
        self.ops: list[Op] = []
        self.constants: dict[tuple, int] = {}
        self._shifted: dict[tuple, str] = {}
        self._temps = 0

    def temp(self) -> str:
        self._temps += 1
        return f"t{self._temps}"

    def imm(self, value: float) -> str:
        return f"imm:{_pair(self.fmt.bits_of(value))}"

    def source(self, word: str, shift: int) -> str:
        if shift == 0:
            return word
        if (word, shift) not in self._shifted:
            self._shifted[(word, shift)] = self.temp()
            self.ops.append(Op("shift", self._shifted[(word, shift)], (word,), amount=shift))
        return self._shifted[(word, shift)]

    def _hi_field(self, m: int, field: int) -> tuple[int, int]:
        """(shift, offset) bringing high-plane field ``field`` (that of low pair ``m``) in place."""
        if self.merge:  # offsets from lo + 1 up keep the merged constant under 128: exact
            j = self.lo_fields[m][1] // self.lo_width + self.lo_width + 1
            return field - j, j
        return _fields(1, 16, self.fmt)[field]

    def pair(self, word: str, m: int, hi: str = "h", hi_field: int = 0) -> str:
        """The register holding ``(q - z) / 16`` of pair ``m`` of low-plane ``word`` (both halves);
        at 3 bits the high bit comes from field ``hi_field`` of ``hi``."""
        shift, o = self.lo_fields[m]
        t = self.temp()
        mask = _pair(((1 << self.lo_width) - 1) << o)
        self.ops.append(Op("extract", t, (self.source(word, shift), f"imm:{mask}", f"imm:{self.magic_pair}")))
        # (magic + 2**o q) * 2**(-o-4) + c = (q - z)/16 (minus what the high fma2 adds back)
        hs, j = self._hi_field(m, hi_field) if self.has_hi else (0, None)
        key = (o, j if self.merge else None)
        if key not in self.constants:
            self.constants[key] = len(self.constants)
        value = self.temp()
        self.ops.append(Op("fma2", value, (t, self.imm(2.0 ** (-o - 4)), f"c{self.constants[key]}")))
        if self.has_hi:
            th = self.temp()
            self.ops.append(Op("extract", th, (self.source(hi, hs), f"imm:{_pair(1 << j)}", f"imm:{self.magic_pair}")))
            # (magic + 2**j b) * 2**(lo-j-4) = magic * 2**(lo-j-4) + 2**lo b / 16: the high bit's weight
            if self.merge:
                merged = self.temp()
                self.ops.append(Op("fma2", merged, (th, self.imm(2.0 ** (self.lo_width - j - 4)), value)))
                return merged
            high = self.temp()
            weight = 2.0 ** (self.lo_width - j - 4)
            self.ops.append(Op("fma2", high, (th, self.imm(weight), self.imm(-self.fmt.magic * weight))))
            summed = self.temp()
            self.ops.append(Op("fma2", summed, (high, self.imm(1.0), value)))
            return summed
        return value

    def zero_constants(self) -> tuple[ZeroConstant, ...]:
        if len(self.constants) > N_CONST:
            raise AssertionError(f"{self.bits}-bit {self.fmt.name} decode needs {len(self.constants)} zero constants")
        out = []
        for (o, j), _ in sorted(self.constants.items(), key=lambda kv: kv[1]):
            base = self.fmt.magic * 2.0 ** (-o - 4)
            if j is not None:
                base += self.fmt.magic * 2.0 ** (self.lo_width - j - 4)
            out.append(_linear_constant(base, self.bits, self.fmt))
        return tuple(out)


@functools.lru_cache(maxsize=None)
def program(bits: int, dtype: str) -> DecodeProgram:
    """The gemv's program: one unit of ``bits``-bit codes against its activations, for ``dtype``
    (``"fp16"`` or ``"bf16"``) activations; the result is fp32 (see the module docstring)."""
    b = _Builder(bits, dtype)
    chain = 4 if dtype == "bf16" else 16
    chain_acc, in_chain = None, 0
    for pair in range(N_X):
        word, m = f"w{pair // b.per_word}", pair % b.per_word
        value = b.pair(word, m, "h", hi_field=pair)  # the high word's field = the unit's pair
        product = b.temp()
        b.ops.append(Op("fma2", product, (value, f"x{pair}", chain_acc or f"imm:{_pair(0x8000)}")))
        chain_acc, in_chain = product, in_chain + 1
        if in_chain == chain:
            b.ops.append(Op("to_f32_add", "acc", (chain_acc,)))
            chain_acc, in_chain = None, 0
    if chain_acc is not None:
        b.ops.append(Op("to_f32_add", "acc", (chain_acc,)))
    return DecodeProgram(bits, dtype, "unit", tuple(b.ops), b.zero_constants(), chain)


@functools.lru_cache(maxsize=None)
def word_program(bits: int, dtype: str) -> DecodeProgram:
    """The tiled kernel's program: the codes of one low-plane word ``w`` as ``dtype`` weights
    ``s * (q - z)``, in K order.  At 3 bits ``h`` holds this word's high bits in its low fields (the
    kernel shifts the unit's high word by 8 for the second low word)."""
    b = _Builder(bits, dtype)
    for m in range(b.per_word):
        value = b.pair("w", m, "h", hi_field=m)
        scaled = b.temp()
        # (q - z)/16 is exact; times 16 s (exact too), one rounding: s * (q - z) rounded once.
        b.ops.append(Op("fma2", scaled, (value, "s", f"imm:{_pair(0x8000)}")))
        b.ops.append(Op("output", f"y{m}", (scaled,)))
    return DecodeProgram(bits, dtype, "word", tuple(b.ops), b.zero_constants(), 0)


def _linear_constant(base: float, bits: int, fmt: HalfFormat) -> ZeroConstant:
    """``-(base + z/16)`` for every zero point ``z`` of ``bits`` bits, as ``base_bits + z * step``
    (true when the values share one binade: checked here, for every ``z``)."""
    first = fmt.bits_of(-base)
    step = fmt.bits_of(-(base + 1 / 16)) - first
    for z in range(2**bits):
        if fmt.bits_of(-(base + z / 16)) != first + z * step:
            raise AssertionError(f"zero constant {base} + z/16 leaves its binade in {fmt.name}")
    return ZeroConstant(base, first, step)
