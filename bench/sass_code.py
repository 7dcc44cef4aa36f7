"""Reading the compiled sm_90a code of a kernel variant: its K loop and what one iteration costs.

Triton and ptxas compile each variant here (no GPU), ``cuobjdump`` (shipped with Triton)
disassembles it, and :func:`analyse` finds the K loop (the backward branch whose body holds the
weight loads), counts one iteration's instructions by class and notes whether the loop is
software-pipelined (asynchronous copies: ``LDGSTS``, TMA).  ``bench/sass_model.py`` predicts
launches from these counts.
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import triton  # noqa: E402

from bench.compile_check import compile_variant  # noqa: E402

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
#: Copies that run while the issuing warp goes on: a loop holding them loads ahead of its compute.
ASYNC_LOADS = ("LDGSTS", "UTMALDG", "UBLKCP")


def instruction_class(opcode: str) -> str:
    root = opcode.split(".")[0]
    if root in _CLASS_OF:
        return _CLASS_OF[root]
    if root.startswith("U"):
        return "uniform"  # the uniform datapath: an issue slot, no vector pipe
    return "other"


_SASS_LINE = re.compile(r"\s+/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


def _cuobjdump(cubin: bytes, flag: str) -> str:
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([str(tool), flag, f.name], capture_output=True, text=True, check=True).stdout


def disassemble(cubin: bytes) -> str:
    return _cuobjdump(cubin, "--dump-sass")


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
            loads = sum(o.split(".")[0] in ("LDG",) + ASYNC_LOADS for _, o, _ in body)
            loops.append((loads, len(body), body))
    if not loops:
        raise ValueError("no loop found in the SASS")
    return max(loops, key=lambda x: (x[0], x[1]))[2]


def count_classes(code) -> dict[str, int]:
    counts = collections.Counter(instruction_class(op) for _, op, _ in code)
    counts["total"] = len(code)
    return dict(counts)


def resources(cubin: bytes) -> dict:
    res = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", _cuobjdump(cubin, "--dump-resource-usage")))
    return {"regs": int(res.get("REG", 0)), "stack": int(res.get("STACK", 0)) + int(res.get("LOCAL", 0))}


@dataclass
class Variant:
    """One compiled kernel variant and what its code costs.

    ``loop`` and ``rest`` count instructions per thread (one K iteration, and everything outside
    the loop once) by class; ``loop_ops`` counts the loop's opcodes (their first name part), so that
    a later model can re-derive classes without compiling again.  ``pipelined``: most of the loop's
    loads are asynchronous copies (``ASYNC_LOADS``), so it loads a later tile while it computes
    this one (plain ``LDG`` loads are waited for in the iteration that uses them).
    """

    schedule: str
    bits: int
    capture: str
    dtype: str
    config: dict
    weights_per_thread_iter: int
    loop: dict = field(default_factory=dict)
    rest: dict = field(default_factory=dict)
    regs: int = 0
    shared: int = 0
    hgmma: bool = False
    pipelined: bool = False
    loop_ops: dict = field(default_factory=dict)

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
    ops = collections.Counter(op.split(".")[0] for _, op, _ in body)
    return Variant(schedule, bits, capture, dtype, config, weights, loop, rest,
                   regs=resources(compiled.asm["cubin"])["regs"], shared=compiled.metadata.shared,
                   hgmma=any(op.startswith("HGMMA") for _, op, _ in code),
                   pipelined=sum(ops.get(op, 0) for op in ASYNC_LOADS) > ops.get("LDG", 0), loop_ops=dict(ops))
