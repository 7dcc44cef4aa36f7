"""The static performance model: it finds and counts the K loop of real compiled code (sm_90a,
compiled here by Triton and ptxas, no GPU), and its predictions follow from its inputs.

Compiling needs Triton without its interpreter, which the kernel tests switch on in this process,
so the variant is compiled and counted in a fresh Python (``python -m bench.sass_model --variant``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import sass_model
from bench.compile_check import GEMV

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gemv_w4() -> sass_model.Variant:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, "-m", "bench.sass_model", "--variant", "gemv", "4"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    fields = json.loads(done.stdout.strip().splitlines()[-1])
    fields.pop("per_weight")
    return sass_model.Variant(**fields)


def test_the_gemv_loop_is_found_and_counted(gemv_w4):
    loop = gemv_w4.loop
    assert loop["total"] > 100
    assert gemv_w4.weights_per_thread_iter == GEMV["BLOCK_N"] * GEMV["BLOCK_U"] // GEMV["num_warps"]
    # Two codes per LOP3 and per HFMA2: the decode runs on the half-precision pipe, without shared memory.
    per = gemv_w4.per_weight_by_class()
    assert per["fp16x2"] >= 0.9 and loop.get("global", 0) > 0 and loop.get("shared", 0) == 0
    # The regression guard of bench/NOTES.md: the 4-bit gemv stays near 2 instructions a weight
    # (5.8 before the decode program), well under the ~4 an H200 allows at its memory limit.
    assert gemv_w4.per_weight < 2.5


def test_prediction_is_the_largest_bound(gemv_w4):
    dev = sass_model.Device()
    p = sass_model.predict(gemv_w4, 4096, 14336, 1, dev)
    assert p["seconds"] == max(p["issue_s"], p["memory_s"], p["tensor_s"])
    nbytes = sass_model.layout_bytes(4096, 14336, 4, 128) + 2 * (4096 + 14336)
    assert p["memory_s"] == pytest.approx(nbytes / dev.bandwidth)
    assert 0 < p["fraction"] <= 1 and p["speedup"] == pytest.approx(p["fraction"] * p["ceiling"])
    # Twice the instructions per weight cannot be faster.
    slow = sass_model.Variant(**{**gemv_w4.__dict__, "loop": {k: 2 * v for k, v in gemv_w4.loop.items()}})
    assert sass_model.predict(slow, 4096, 14336, 1, dev)["issue_s"] > p["issue_s"]


def test_no_loop_is_an_error():
    code = sass_model.instructions("        /*0000*/                   EXIT ;\n")
    with pytest.raises(ValueError, match="no loop"):
        sass_model.k_loop(code)


def test_instruction_classes():
    assert sass_model.instruction_class("HFMA2.MMA") == "fp16x2"
    assert sass_model.instruction_class("LOP3.LUT") == "int"
    assert sass_model.instruction_class("LDG.E.128") == "global"
    assert sass_model.instruction_class("LDSM.16.M88.4") == "shared"
    assert sass_model.instruction_class("HGMMA.64x16x16.F32") == "tensor"
    assert sass_model.instruction_class("ULEA") == "uniform"
