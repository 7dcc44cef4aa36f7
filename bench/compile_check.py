"""Compile every kernel variant for a GPU target without needing the GPU, and report resources.

    python -m bench.compile_check [--arch 90] [--json out.json]

Triton compiles to PTX and runs ptxas on the host, so this catches compile errors, register
spills and local-memory use (a stack frame) on any machine.  It prints one row per variant:
registers per thread, stack/local bytes (spills), shared memory, and from the SASS: tensor-core
(HGMMA/HMMA) instructions, 128-bit global loads, int->float conversions, local-memory accesses,
and shared-memory instructions inside the K loop (for gemv that would be a layout shuffle).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from bitcliff.kernels import qmatmul  # noqa: E402
from bitcliff.kernels.pack import SUPPORTED_BITS  # noqa: E402

POINTERS = {
    "x_ptr": "*fp16", "lo_ptr": "*i32", "hi_ptr": "*i32", "scales_ptr": "*fp16", "zeros_ptr": "*u8",
    "kidx_ptr": "*i32", "bias_ptr": "*fp16", "wfp_ptr": "*fp16", "y_ptr": "*fp16",
    "cap_a_ptr": "*fp32", "cap_b_ptr": "*fp32", "ws_ptr": "*fp32", "lock_ptr": "*i32",
}
INTS = ("M", "N", "K", "KP", "M_BUCKET", "stride_xm", "stride_wfp", "stride_ym")


def compile_variant(kernel, constexprs: dict, arch: int, dtype: str):
    signature = {name: POINTERS.get(name, "i32") for name in kernel.arg_names if name in POINTERS or name in INTS}
    for name in ("x_ptr", "y_ptr", "wfp_ptr"):
        signature[name] = f"*{dtype}"
    meta = {k: v for k, v in constexprs.items() if k not in ("num_warps", "num_stages")}
    signature.update({k: "constexpr" for k in meta})
    # Tell the compiler what the launcher's real arguments satisfy (16-divisible sizes/strides).
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(kernel.arg_names)
             if name in POINTERS or name in ("N", "K", "KP", "stride_xm", "stride_wfp", "stride_ym")}
    src = ASTSource(fn=kernel, signature=signature, constexprs=meta, attrs=attrs)
    options = {"num_warps": constexprs["num_warps"], "num_stages": constexprs["num_stages"]}
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def sass_summary(cubin: bytes) -> dict:
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        try:
            sass = subprocess.run([cuobjdump, "--dump-sass", f.name], capture_output=True, text=True,
                                  check=True).stdout
            usage = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True,
                                   text=True, check=True).stdout
        except (OSError, subprocess.CalledProcessError):
            return {}
    res = dict(re.findall(r"(REG|STACK|LOCAL):(\d+)", usage))
    # Shared-memory traffic inside the K loop (up to its backward branch) means a layout shuffle.
    lines = sass.splitlines()
    back = next((i for i, line in enumerate(lines) if re.search(r"@!?P\d+\s+BRA\s+0x", line)
                 and "0xf" in line.split("/*")[-1]), len(lines))
    loop_smem = sum(bool(re.search(r"\b(LDS|STS|BAR)\b", line)) for line in lines[:back])
    return {
        "regs": int(res.get("REG", -1)),
        "stack": int(res.get("STACK", -1)) + int(res.get("LOCAL", 0)),
        "hgmma": len(re.findall(r"\bHGMMA\b", sass)),
        "hmma": len(re.findall(r"\bHMMA\b", sass)),
        "ldg128": len(re.findall(r"LDG\.E\.128", sass)),
        "ldg": len(re.findall(r"\bLDG\b", sass)),
        "i2f": len(re.findall(r"\bI2F", sass)),
        "local": len(re.findall(r"\b(LDL|STL)\b", sass)),
        "loop_smem": loop_smem,
    }


def constexprs(schedule: str, bits: int, capture: str, dtype: str, config: dict, *, group: int = 128,
               bias: bool = False, permuted: bool = False) -> dict:
    """Every constexpr of a kernel launch as the launcher (``qmatmul.quant_matmul``) would pass it,
    for fp16/bf16 activations on a GPU (whole tiles: no masks in the gemv loop)."""
    import torch

    from bitcliff.kernels import qmatmul
    from bitcliff.kernels.layout import width

    spec = width(bits)
    meta = {"BITS": bits, "GROUP_SIZE": group, "CAPTURE": capture, "LO": spec.lo, "HI": spec.hi, "HAS_BIAS": bias,
            "PERMUTED": permuted, "INTERPRET": False}
    meta.update(qmatmul.decode_meta(schedule, {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype], bits))
    meta.update(config)
    if schedule == "gemv":
        meta["EVEN"] = True
    else:
        meta["FAST"] = qmatmul.tiled_fast(meta)
        meta["EVEN_K"] = True  # the Llama shapes: K a multiple of every BLOCK_K
    return meta


def kernel(schedule: str):
    from bitcliff.kernels import gemv, tiled

    return gemv.qmm_gemv_kernel if schedule == "gemv" else tiled.qmm_tiled_kernel


GEMV = {"BLOCK_N": 256, "BLOCK_U": 4, "SPLIT_K": 1, "num_warps": 1, "num_stages": 1}
TILED = {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "SPLIT_K": 1, "GROUP_M": 8, "num_warps": 4,
         "num_stages": 3}


def variants(dtype: str = "fp16"):
    for bits, capture, split in itertools.product(SUPPORTED_BITS, ("none", "stats", "error"), (1, 4)):
        for schedule, config in (("gemv", GEMV), ("tiled", TILED)):
            yield schedule, kernel(schedule), constexprs(schedule, bits, capture, dtype, dict(config, SPLIT_K=split))
    for schedule, config in (("gemv", GEMV), ("tiled", TILED)):
        yield schedule, kernel(schedule), constexprs(schedule, 4, "none", dtype, config, group=32, bias=True,
                                                     permuted=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--dtype", default="fp16", choices=("fp16", "bf16"))
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if qmatmul.INTERPRETED:
        print("TRITON_INTERPRET is set: nothing to compile", file=sys.stderr)
        return 2
    rows = []
    print(f"triton {triton.__version__}, sm_{args.arch}, {args.dtype}")
    print(f"{'schedule':8} {'bits':>4} {'capture':8} {'split':>5} {'gs':>4} {'regs':>5} {'stack':>6} "
          f"{'smem':>7} {'hgmma':>6} {'hmma':>5} {'ldg128':>6} {'i2f':>4} {'local':>5} {'loopsmem':>8}")
    failures = 0
    for schedule, fn, meta in variants(args.dtype):
        try:
            compiled = compile_variant(fn, meta, args.arch, args.dtype)
        except Exception as exc:  # report every failing variant, not just the first
            failures += 1
            print(f"{schedule:8} {meta['BITS']:>4} {meta['CAPTURE']:8} FAILED: {exc}")
            continue
        md = compiled.metadata
        sass = sass_summary(compiled.asm["cubin"])
        row = {"schedule": schedule, **{k: v for k, v in meta.items() if not isinstance(v, str) or len(v) < 40},
               "shared": md.shared, **sass}
        rows.append(row)
        print(f"{schedule:8} {meta['BITS']:>4} {meta['CAPTURE']:8} {meta['SPLIT_K']:>5} "
              f"{meta['GROUP_SIZE']:>4} {sass.get('regs', '?'):>5} {sass.get('stack', '?'):>6} {md.shared:>7} "
              f"{sass.get('hgmma', '?'):>6} {sass.get('hmma', '?'):>5} {sass.get('ldg128', '?'):>6} "
              f"{sass.get('i2f', '?'):>4} {sass.get('local', '?'):>5} {sass.get('loop_smem', '?'):>8}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"triton": triton.__version__, "arch": args.arch, "rows": rows}, f, indent=1)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
