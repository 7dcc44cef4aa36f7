"""bitcliff checkpoints of the embedded SmolLM2-135M served by vLLM (CPU build) through the plugin.

Greedy continuations in fp32 must equal ``bitcliff.load``'s token for token.  Both run bitcliff's
kernel on the same packed weights, but the rest of the model (attention, norms, the head) is
vLLM's own code, summing in another order; so a divergence is accepted only at a step where
``bitcliff.load``'s top two logits are within :data:`TIE_MARGIN` (a near-tie that fp32 summation
order may flip), and the test reports every such step.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from checkpoints import NEW_TOKENS, bitcliff_greedy, make_checkpoint, make_repaired_checkpoint, prompt_ids

pytest.importorskip("vllm", reason="needs vLLM (make test-vllm installs it)")

#: Logit gap below which two paths computing in fp32 may legitimately pick different tokens.
TIE_MARGIN = 1e-3

VARIANTS = {
    "w2-rtn-g64-asym": dict(bits=2, group_size=64),
    "w3-rtn-g64-asym": dict(bits=3, group_size=64),
    "w4-rtn-g128-asym": dict(bits=4, group_size=128),
    "w3-gptq-g64-act-order": dict(bits=3, group_size=64, method="gptq", act_order=True, calib_samples=8,
                                  refit_rounds=0, true_sequential=False),
    "mixed-w3-w4-w2": dict(bits=3, group_size=64, module_widths=(
        *((f"model.layers.0.self_attn.{p}", 4, 128) for p in ("q_proj", "k_proj", "v_proj", "o_proj")),
        *((f"model.layers.1.mlp.{p}", 2, 32) for p in ("gate_proj", "up_proj")),
        ("model.layers.2.mlp.down_proj", 2, 64),
    )),
    # fused layers whose parts are stored at different widths and group sizes
    "mixed-fused-q4-k2-v3": dict(bits=3, group_size=64, module_widths=(
        ("model.layers.0.self_attn.q_proj", 4, 128), ("model.layers.0.self_attn.k_proj", 2, 32),
        ("model.layers.1.mlp.gate_proj", 4, 64), ("model.layers.1.mlp.up_proj", 2, 128),
    )),
    # fused layers with a part in full precision (a ``-:`` rule, as a restored 4-bit module gets)
    "mixed-fused-q4-k-fp-v3": dict(bits=3, group_size=64,
                                   skip_modules=("lm_head", "model.layers.0.self_attn.k_proj",
                                                 "model.layers.1.mlp.up_proj"),
                                   module_widths=(("model.layers.0.self_attn.q_proj", 4, 128),)),
}


#: Repaired checkpoints: every correction the plugin adds in its layers (quantized and fp16
#: low-rank terms, sparse outliers, bias correction), the norm recalibration folded into the
#: weights, and restoration, which stores single projections of a fused layer wider (the main
#: job's W2 plan: restore, low rank, norm).
REPAIRED = {
    "w3-rtn-g64-repaired": (["lowrank", "outliers", "bias", "norm"], dict(bits=3, group_size=64)),
    "w2-rtn-g64-repaired-restore-fp16-factors": (["restore", "lowrank", "norm"], dict(bits=2, group_size=64)),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Checkpoints made on first use, kept for the module."""
    root = tmp_path_factory.mktemp("checkpoints")
    made = {}

    def get(name):
        if name not in made:
            if name in REPAIRED:
                methods, settings = REPAIRED[name]
                factor_bits = 16 if "fp16" in name else None
                made[name] = make_repaired_checkpoint(root / name, methods, factor_bits=factor_bits, **settings)
            else:
                made[name] = make_checkpoint(root / name, **VARIANTS[name])
        return made[name]

    return get


def vllm_greedy(folder, prompts, **engine):
    """vLLM's greedy continuations of ``prompts`` (token ids) from ``folder`` (or a hub id) in fp32."""
    from vllm import LLM, SamplingParams

    # a fixed KV cache: the CPU backend otherwise reserves 92 % of the machine's memory, and refuses
    # to start while other processes hold some of it
    llm = LLM(model=str(folder), dtype="float32", max_model_len=256, enforce_eager=True, seed=0,
              kv_cache_memory_bytes=256 * 2**20, **engine)
    try:
        outs = llm.generate([{"prompt_token_ids": ids} for ids in prompts],
                            SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True))
        return [list(o.outputs[0].token_ids) for o in outs]
    finally:
        if hasattr(llm, "shutdown"):  # frees the engine processes before the next test starts its own
            llm.shutdown()


#: What a subprocess prints before its continuations (vLLM logs to stdout too).
RESULT = "continuations: "


def vllm_greedy_in(env: dict[str, str], model: str, prompts) -> list[list[int]]:
    """:func:`vllm_greedy` in a fresh Python with ``env`` added: settings the Hugging Face libraries
    read when imported (the hub cache, offline mode) reach the engine and all its processes."""
    code = (f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            "from test_vllm_serving import vllm_greedy; "
            f"print({RESULT!r} + json.dumps(vllm_greedy({model!r}, {prompts!r})))")
    run = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True,
                         timeout=900)
    lines = [line for line in run.stdout.splitlines() if line.startswith(RESULT)]
    assert run.returncode == 0 and lines, run.stdout[-3000:] + run.stderr[-6000:]
    return json.loads(lines[-1][len(RESULT):])


def check_greedy(folder, variant, served=None, **engine):
    """vLLM's greedy continuations equal ``bitcliff.load``'s from ``folder``; ``served`` gives
    vLLM's continuations in place of serving ``folder`` in this process."""
    prompts = prompt_ids(folder)
    expected, margins, shifts = bitcliff_greedy(folder, prompts)
    got = served(prompts) if served is not None else vllm_greedy(folder, prompts, **engine)
    for p, (want, have, gaps, moved) in enumerate(zip(expected, got, margins, shifts)):
        assert len(have) == NEW_TOKENS
        first = next((i for i, (a, b) in enumerate(zip(want, have)) if a != b), None)
        if first is None:
            continue
        # fp32 summation order, or the 15-bit rounding of activations that differ in their last bits
        allowed = TIE_MARGIN + 2 * moved[first]
        assert gaps[first] < allowed, (
            f"{variant}, prompt {p}: vLLM diverges at token {first} ({have[first]} vs bitcliff.load's "
            f"{want[first]}) where the top-2 logit gap is {gaps[first]:.4g}, not within {allowed:.3g} "
            f"(a near-tie, or twice how far the integer decode has drifted from fp32 by that step)")
        print(f"{variant}, prompt {p}: near-tie divergence at token {first} (gap {gaps[first]:.2g})")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_greedy_continuation_equals_bitcliff_load(checkpoints, variant):
    check_greedy(checkpoints(variant), variant)


@pytest.mark.parametrize("variant", ["w3-gptq-g64-act-order", "w3-rtn-g64-repaired", "mixed-fused-q4-k-fp-v3"])
def test_tensor_parallel_engine_equals_bitcliff_load(checkpoints, monkeypatch, variant):
    """Three ranks (SmolLM2's 9 query and 3 key/value heads split evenly): column-parallel q/k/v and
    gate/up, row-parallel o/down with act-order groups, 3-bit words cut at every rank boundary; the
    repaired checkpoint's low-rank terms, outliers and biases cut to each rank's rows and columns;
    a fused layer's full-precision part cut to each rank's rows."""
    # Three workers on a machine with fewer cores: let them share instead of binding one per core.
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    check_greedy(checkpoints(variant), f"{variant}, 3 ranks", tensor_parallel_size=3,
                 distributed_executor_backend="mp")


@pytest.mark.parametrize("variant", list(REPAIRED))
def test_repaired_checkpoint_serves_with_its_repairs(checkpoints, variant):
    folder = checkpoints(variant)
    files = {p.name for p in folder.iterdir()}
    assert files & {"lowrank.safetensors", "adapter_model.safetensors"}, files  # the repair stored its terms
    check_greedy(folder, variant)


def test_a_repaired_checkpoint_served_by_hub_id_keeps_its_repairs(checkpoints, tmp_path):
    """``vllm serve someone/model``: the plugin finds the side files in the hub cache's snapshot
    (offline here, the cache laid out as a download leaves it) and serves the repairs."""
    folder = checkpoints("w3-rtn-g64-repaired")
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--smol-w3-repaired"
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    check_greedy(folder, "w3-rtn-g64-repaired by hub id",
                 served=lambda prompts: vllm_greedy_in(env, "someone/smol-w3-repaired", prompts))


def test_claims_through_vllms_own_selection():
    """vLLM asks the registered config first; symmetric 4-bit without extras stays vLLM's."""
    from vllm.model_executor.layers.quantization import get_quantization_config
    from vllm.plugins import load_general_plugins

    load_general_plugins()  # through the installed entry point, as every vLLM process does
    config = get_quantization_config("bitcliff")
    asym = {"quant_method": "gptq", "bits": 3, "group_size": 64, "sym": False, "desc_act": False,
            "checkpoint_format": "gptq_v2"}
    sym4 = {"quant_method": "gptq", "bits": 4, "group_size": 128, "sym": True, "desc_act": False}
    assert config.override_quantization_method(asym, None) == "bitcliff"
    assert config.override_quantization_method(sym4, None) is None
    assert config.override_quantization_method(sym4, "bitcliff") == "bitcliff"
    assert config.override_quantization_method(asym, "gptq") is None  # an explicit other choice wins
