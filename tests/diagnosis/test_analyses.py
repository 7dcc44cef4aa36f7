"""Each analysis on a tiny random Llama: exact identities where they exist (a model against
itself, the last-layer residual patch), shapes, and hooks gone afterwards."""

from __future__ import annotations

import copy

import pytest
import torch

from bitcliff import QuantConfig, quantize
from bitcliff.diagnosis.components import assess_components
from bitcliff.diagnosis.fp_record import model_logits, record_fp
from bitcliff.diagnosis.hooks import Hooks
from bitcliff.diagnosis.inputs import input_sensitivity
from bitcliff.diagnosis.layer_errors import LayerErrors, capture_layer_errors
from bitcliff.diagnosis.model_parts import (
    IncompatibleModels,
    check_compatible,
    component,
    decoder_layers,
    dequantized_twin,
    logit_lens,
)
from bitcliff.diagnosis.patching import patch_activations
from bitcliff.diagnosis.quantized_runs import run_quantized
from bitcliff.diagnosis.signal import trace_signal
from bitcliff.kernels.cpu import exact_activations
from bitcliff.layers import LayerCalls, find_decoder_layers, run_layers
from bitcliff.quant.qlinear import QuantLinear


def _hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.fixture
def examples():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 128, (24,), generator=g) for _ in range(4)]


@pytest.fixture
def quantized(tiny_llama):
    return quantize(copy.deepcopy(tiny_llama), QuantConfig(bits=2, group_size=32), progress=False)


def test_dequantized_twin_matches_the_quantized_model(quantized, examples):
    twin = dequantized_twin(quantized)
    assert not any(isinstance(m, QuantLinear) for m in twin.modules())
    assert any(isinstance(m, QuantLinear) for m in quantized.modules())  # original untouched
    with torch.inference_mode(), exact_activations():  # the weights' product, without the 15-bit rounding
        torch.testing.assert_close(model_logits(twin, examples[0]), model_logits(quantized, examples[0]),
                                   rtol=1e-5, atol=1e-5)


def test_model_against_itself_is_perfect(tiny_llama, examples):
    impl = tiny_llama.config._attn_implementation
    signal = trace_signal(tiny_llama, tiny_llama, examples[:2], lens_tokens=5)
    assert signal.rel_error == [0.0, 0.0] and signal.local_error == [0.0, 0.0]
    assert signal.cosine == pytest.approx([1.0, 1.0])
    assert signal.lens_top1 == [1.0, 1.0] and signal.lens_rank == [0.0, 0.0]
    assert signal.lens_kl == pytest.approx([0.0, 0.0], abs=1e-9)
    comps = assess_components(tiny_llama, tiny_llama, examples[:2], attention_rows=4)
    for run in ("prop", "local"):
        for c in ("attn", "mlp"):
            assert comps.function[run][c] == pytest.approx([1.0, 1.0])
        assert comps.gate_agreement[run] == [1.0, 1.0]
        assert comps.mean_attention_js(run) == pytest.approx([0.0, 0.0], abs=1e-9)
    patching = patch_activations(tiny_llama, tiny_llama, examples[:1], progress=False)
    assert patching.damage_nats == 0.0 and patching.total_single is None
    assert all(v is None for values in patching.recovery.values() for v in values)
    assert _hook_count(tiny_llama) == 0
    assert tiny_llama.config._attn_implementation == impl


def test_quantized_run_measures(tiny_llama, quantized, examples):
    twin = dequantized_twin(quantized)
    impl = tiny_llama.config._attn_implementation
    signal = trace_signal(tiny_llama, twin, examples[:2], lens_tokens=6)
    assert len(signal.rel_error) == 2 and all(e > 0 for e in signal.rel_error)
    assert signal.local_error[0] == pytest.approx(signal.rel_error[0])  # layer 0 sees the FP input anyway
    assert signal.growth[0] is None and signal.growth[1] == pytest.approx(signal.rel_error[1] / signal.rel_error[0])
    assert len(signal.nll_q) == 2 and signal.examples == 2
    comps = assess_components(tiny_llama, twin, examples[:2], attention_rows=6)
    assert len(comps.attention_js["prop"][0]) == tiny_llama.config.num_attention_heads
    assert all(0.0 <= g <= 1.0 for g in comps.gate_agreement["prop"])
    assert comps.function["local"]["attn"][0] == pytest.approx(comps.function["prop"]["attn"][0])
    assert tiny_llama.config._attn_implementation == impl  # eager switched back
    assert _hook_count(twin) == 0 and _hook_count(tiny_llama) == 0


def test_patching_resume_is_exact_and_last_residual_recovers_everything(tiny_llama, quantized, examples):
    twin = dequantized_twin(quantized)
    layers = decoder_layers(twin)
    ids = examples[0]
    record = record_fp(tiny_llama, ids)
    recorded = LayerCalls(find_decoder_layers(twin)[1])
    logits = run_quantized(twin, record, "prop", calls=recorded)
    inputs, calls = [per_layer[0] for per_layer in recorded.inputs], recorded.for_forward(0)
    with torch.inference_mode():
        assert torch.equal(logit_lens(twin, run_layers(layers, calls, inputs[0])[0]), logits)
        with Hooks() as hooks:
            hooks.output(component(layers[1], "attn"), lambda h: record.outputs["attn"][1][None])
            patched_whole = model_logits(twin, ids)  # the patch inside a full forward ...
            torch.testing.assert_close(logit_lens(twin, run_layers(layers, calls, inputs[1], 1)[0]), patched_whole)
        assert not torch.allclose(patched_whole, logits)  # ... which the patch changed
    result = patch_activations(tiny_llama, twin, examples[:2], progress=False)
    assert result.damage_nats > 0
    # restoring the stream after the last layer gives the FP logits: all damage recovered
    assert result.recovery["residual"][-1] == pytest.approx(1.0, abs=1e-6)
    assert result.total_single == pytest.approx(sum(result.recovery["attn"]) + sum(result.recovery["mlp"]))
    assert _hook_count(twin) == 0
    with pytest.raises(ValueError, match="unknown patching targets"):
        patch_activations(tiny_llama, twin, examples[:1], targets=("heads",), progress=False)


def test_capture_layer_errors(tiny_llama, quantized, examples):
    errors = capture_layer_errors(tiny_llama, quantized, examples[:2])
    assert len(errors.modules) == 7 * 2 and len(errors.layers) == 2
    assert errors.tokens == 48
    # per layer = sqrt(sum err / sum ref) over its modules: between the best and worst module
    for row in errors.layers:
        own = [m["rel_err"] for m in errors.modules if m["layer"] == row["layer"]]
        assert min(own) <= row["rel_err"] <= max(own)
    assert all(m.capture is None for m in quantized.modules() if isinstance(m, QuantLinear))
    with pytest.raises(ValueError, match="2 capture layers vs 3 traced layers"):
        errors.cross_check([0.1, 0.2, 0.3])


def test_capture_cross_check_is_a_rank_correlation_over_layers():
    errors = LayerErrors(modules=[], layers=[{"layer": i, "rel_err": e} for i, e in enumerate([0.1, 0.4, 0.2, 0.3])],
                         tokens=0)
    assert errors.agreement_with_trace is None
    rho = errors.cross_check([1.0, 4.0, 2.0, 3.0])  # same order: perfect agreement, stored and returned
    assert rho == pytest.approx(1.0) and errors.agreement_with_trace == rho
    assert errors.cross_check([4.0, 1.0, 3.0, 2.0]) == pytest.approx(-1.0)


def test_input_sensitivity(tiny_llama, quantized, examples):
    w4 = quantize(copy.deepcopy(tiny_llama), QuantConfig(bits=4, group_size=32), progress=False)
    result = input_sensitivity(tiny_llama, {"w2": dequantized_twin(quantized), "w4": w4}, examples,
                               top_fraction=0.25, progress=False)
    assert len(result.delta_nll["w2"]) == 4 and len(result.magnitude[0]) == 3  # L + 1 boundaries
    assert result.correlation["pearson"]["w2"]["w2"] == pytest.approx(1.0)
    assert result.correlation["spearman"]["w2"]["w4"] == result.correlation["spearman"]["w4"]["w2"]
    pred = result.predictor["w2"]
    assert pred["positives"] == 1 and len(pred["auroc"]) == 3 and pred["examples"] == 4
    assert pred["final_auroc"] is None and "4 examples give 1 broken" in pred["withheld"]  # too few to rank
    with pytest.raises(ValueError, match="at least 3 examples"):
        input_sensitivity(tiny_llama, {"w2": quantized}, examples[:2], progress=False)


def test_input_statistics_carry_their_sample_size_and_intervals():
    from bitcliff.diagnosis.inputs import InputsAccumulator

    acc = InputsAccumulator(["q"], 20, top_fraction=0.25)
    for i in range(20):  # damage grows with the last-layer magnitude: a perfect predictor there
        acc.add(i, 2.0, [1.0, float(i)], {"q": 2.0 + 0.1 * i})
    pred = acc.result().predictor["q"]
    assert pred["withheld"] is None and pred["positives"] == 5 and pred["examples"] == 20
    assert pred["final_auroc"] == 1.0 and pred["best_auroc"] == max(pred["auroc"])
    low, high = pred["final_spearman_interval"]
    assert pred["final_spearman"] == pytest.approx(1.0) and low > 0.9 and high <= 1.0
    low, high = pred["final_auroc_interval"]
    assert 0.0 <= low <= pred["final_auroc"] <= high <= 1.0


def test_incompatible_models_are_refused(tiny_llama, quantized):
    from transformers import LlamaForCausalLM

    from tests.conftest import tiny_llama_config

    other_vocab = LlamaForCausalLM(tiny_llama_config(vocab_size=256)).eval()
    other_vocab = quantize(other_vocab, QuantConfig(bits=4, group_size=32), progress=False)
    with pytest.raises(IncompatibleModels, match="vocabulary size"):
        check_compatible(tiny_llama, other_vocab)
    deeper = quantize(LlamaForCausalLM(tiny_llama_config(num_hidden_layers=3)).eval(),
                      QuantConfig(bits=4, group_size=32), progress=False)
    with pytest.raises(IncompatibleModels, match="number of layers"):
        check_compatible(tiny_llama, deeper)
    with pytest.raises(IncompatibleModels, match="no QuantLinear"):
        check_compatible(tiny_llama, tiny_llama)
    check_compatible(tiny_llama, quantized)
