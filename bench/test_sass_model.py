"""The static performance model: it finds and counts the K loop of real compiled code (sm_90a,
compiled here by Triton and ptxas, no GPU), and its predictions follow from its inputs.

Compiling needs Triton without its interpreter, which the kernel tests switch on in this process,
so the variant is compiled and counted in a fresh Python (``python -m bench.sass_model --variant``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import sass_model
from bench.compile_check import GEMV
from bench.devices import device_for
from bench.seed import SEED_ORDER_MAX, seed_order

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


def test_both_bounds_and_the_latency(gemv_w4):
    """Overlapped: the largest term; serialized: their sum (a loop that waits for its own loads);
    both plus the fixed launch-and-tail latency, which fp16 pays too."""
    dev = sass_model.Device()
    assert not gemv_w4.pipelined and gemv_w4.loop_ops.get("LDG", 0) > 0  # plain loads, no async copies
    p = sass_model.predict(gemv_w4, 4096, 14336, 1, dev)
    terms = (p["issue_s"], p["memory_s"], p["tensor_s"])
    assert p["overlapped_s"] == pytest.approx(max(terms) + dev.latency_s)
    assert p["serialized_s"] == pytest.approx(sum(terms) + dev.latency_s)
    assert p["overlapped_s"] < p["serialized_s"] and p["latency_s"] == dev.latency_s >= 1e-6
    nbytes = sass_model.layout_bytes(4096, 14336, 4, 128) + 2 * (4096 + 14336)
    assert p["memory_s"] == pytest.approx(nbytes / dev.bandwidth)
    fp16 = sass_model.fp16_time(4096, 14336, 1, dev)
    assert p["speedup_overlapped"] == pytest.approx(fp16 / p["overlapped_s"])
    assert p["speedup_serialized"] == pytest.approx(fp16 / p["serialized_s"])
    assert p["speedup_serialized"] < p["speedup_overlapped"]
    assert p["speedup_overlapped"] < p["ceiling"]  # the latency costs ours a larger share than fp16's
    no_latency = dataclasses.replace(dev, launch_s=0.0, tail_s=0.0)
    assert sass_model.predict(gemv_w4, 4096, 14336, 1, no_latency)["overlapped_s"] == pytest.approx(max(terms))
    assert fp16 - sass_model.fp16_time(4096, 14336, 1, no_latency) == pytest.approx(dev.latency_s)
    # Twice the instructions per weight cannot be faster, by either bound.
    slow = sass_model.Variant(**{**gemv_w4.__dict__, "loop": {k: 2 * v for k, v in gemv_w4.loop.items()}})
    q = sass_model.predict(slow, 4096, 14336, 1, dev)
    assert q["issue_s"] > p["issue_s"] and q["serialized_s"] > p["serialized_s"]
    assert q["overlapped_s"] >= p["overlapped_s"]


def test_a_pipelined_loop_exposes_only_its_first_iteration(gemv_w4):
    dev = sass_model.Device()
    piped = sass_model.Variant(**{**gemv_w4.__dict__, "pipelined": True})
    p = sass_model.predict(piped, 8192, 28672, 1, dev)
    terms = (p["issue_s"], p["memory_s"], p["tensor_s"])
    assert p["iters"] == 8192 // 32 // GEMV["BLOCK_U"]  # SPLIT_K 1
    assert p["serialized_s"] == pytest.approx(max(terms) + (sum(terms) - max(terms)) / p["iters"] + dev.latency_s)
    assert p["serialized_s"] < sass_model.predict(gemv_w4, 8192, 28672, 1, dev)["serialized_s"]


def test_each_device_has_its_own_bandwidth(gemv_w4):
    h100, h200 = device_for("NVIDIA H100 80GB HBM3"), device_for("NVIDIA H200")
    assert (h100.bandwidth, h200.bandwidth, h100.sms, h200.sms) == (3.0e12, 4.3e12, 132, 132)
    assert device_for("NVIDIA H100 PCIe") is h100 and device_for("Tesla T4") is None
    a, b = (sass_model.predict(gemv_w4, 4096, 14336, 1, d) for d in (h100, h200))
    assert a["memory_s"] / b["memory_s"] == pytest.approx(4.3 / 3.0) and a["issue_s"] == b["issue_s"]


def test_candidates_are_pruned_and_ranked_by_the_pessimistic_bound(gemv_w4):
    """Every ranked configuration is one the tuner's pruning keeps; the order is by the serialized
    bound; the seed's share starts with the best and holds only what the bounds cannot rule out."""
    from bitcliff.kernels import tuning

    source = sass_model.current_source()
    pool = {}
    for c in tuning.gemv_configs():  # the counted loop stands in for every configuration's
        cfg = sass_model.config_of(c)
        pool[sass_model.code_key("gemv", cfg)] = sass_model.Variant(
            **{**gemv_w4.__dict__, "config": {**gemv_w4.config, **cfg}})
    dev = sass_model.Device()
    options = sass_model.ranked(pool, source, "gemv", 4096, 4096, 1, dev)
    assert len(options) == len(tuning.prune("gemv", tuning.gemv_configs(), 1, 4096, 4096, 132, 128)) > 1
    assert all(tuning.admissible("gemv", cfg, 1, 4096, 4096, 132, 128) for _, _, cfg in options)
    bounds = [p["serialized_s"] for p, _, _ in options]
    assert bounds == sorted(bounds)
    order = seed_order(options)
    assert order[0] is options[0] and 1 <= len(order) <= SEED_ORDER_MAX
    assert all(p["overlapped_s"] < options[0][0]["serialized_s"] for p, _, _ in order[1:])


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
