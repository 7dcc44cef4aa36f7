"""GPTQ for one decoder layer: the true-sequential schedule, share groups, errors in suspended forwards."""

from __future__ import annotations

import threading

import pytest
import torch
from gptq_helpers import assert_same_tensors, calib, gptq, quant_tensors, tiny_model

from bitcliff.group_walk import GroupWalk, capture_calibration_inputs
from bitcliff.layers import LayerCalls, find_decoder_layers
from bitcliff.quant import gptq_layer
from bitcliff.quant.gptq_model import quantize_gptq
from bitcliff.quant.qlinear import QuantLinear


def test_true_sequential_solves_each_group_on_inputs_from_the_quantized_groups_before_it(monkeypatch):
    """The suspended single forward must give what restarting the layer for every group gives."""
    ids = calib()
    config = gptq(true_sequential=True, act_order=True)
    fast = quantize_gptq(tiny_model(), config, progress=False, calib_ids=ids, batch_size=4)

    def restart_per_group(layer, targets, groups, inputs, calls, config, *, full_names, ranks=None):
        results, seconds, tokens = {}, {}, {}
        for group in groups:  # a whole forward per group, through the groups already quantized
            for found in GroupWalk(layer, targets, inputs, calls, name="layer", groups=[group], sequential=False):
                result = gptq_layer.gptq_quantize(gptq_layer._stacked(group, targets), found.statistics.hessian(),
                                                  config)
                count = found.statistics.count
            sizes = [targets[n].out_features for n in group]
            solved = dict(zip(group, gptq_layer.split_result(result, sizes)))
            gptq_layer._swap_in(targets, solved)
            results.update(solved)
            seconds.update({n: 0.0 for n in group})
            tokens.update({n: count for n in group})
        return gptq_layer.SolvedLayer(gptq_layer._forward_all(layer, inputs, calls), results, seconds, tokens)

    monkeypatch.setattr(gptq_layer, "solve_layer", restart_per_group)
    slow = quantize_gptq(tiny_model(), config, progress=False, calib_ids=ids, batch_size=4)
    assert_same_tensors(quant_tensors(fast), quant_tensors(slow))


def test_an_error_inside_a_suspended_forward_surfaces_and_frees_the_threads():
    model = tiny_model()
    calls = []

    def boom(module, args):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("broken o_proj")

    model.model.layers[0].self_attn.o_proj.register_forward_pre_hook(boom)
    before = threading.active_count()
    with pytest.raises(RuntimeError, match="broken o_proj"):
        quantize_gptq(model, gptq(true_sequential=True), progress=False, calib_ids=calib(), batch_size=1)
    assert threading.active_count() == before


@pytest.mark.parametrize("true_sequential", [False, True])
def test_one_step_swaps_the_linears_and_logs_the_share_groups(true_sequential):
    model = tiny_model()
    prefix, layers = find_decoder_layers(model)
    recorded: LayerCalls = capture_calibration_inputs(model, layers, calib(), batch_size=4)
    step = gptq_layer.quantize_decoder_layer(layers[0], f"{prefix}.0", recorded.inputs[0], recorded.calls[0],
                                             gptq(true_sequential=true_sequential))
    assert [e.module for e in step.log] == [f"model.layers.0.{n}" for n in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    assert step.groups == [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
                           ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]
    assert all(e.layer == 0 and e.tokens == 6 * 24 for e in step.log)
    assert sum(isinstance(m, QuantLinear) for m in layers[0].modules()) == 7
    with torch.no_grad():  # the outputs are what the quantized layer computes
        expected = layers[0](recorded.inputs[0][0], *recorded.calls[0][0].args, **recorded.calls[0][0].kwargs)
    torch.testing.assert_close(step.outputs[0], expected[0] if isinstance(expected, tuple) else expected)
