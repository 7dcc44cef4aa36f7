"""Mixed precision: the Fisher sensitivity, per-module widths through RTN, GPTQ and the checkpoint
(its knapsack: tests/test_knapsack.py)."""

from __future__ import annotations

import copy

import pytest
import torch
from gptq_helpers import calib, gptq, tiny_model

import bitcliff
from bitcliff.quant.config import QuantConfig
from bitcliff.quant.dynamic import module_overrides
from bitcliff.quant.mixed import choose_widths
from bitcliff.quant.qlinear import QuantLinear
from bitcliff.quant.sensitivity import fisher_diagonal


def test_fisher_diagonal_is_the_sum_of_squared_window_gradients():
    model = tiny_model()
    ids = calib()[:3]
    name = "model.layers.0.mlp.down_proj"
    fisher = fisher_diagonal(model, [name], ids)[name]
    expected = torch.zeros_like(fisher)
    weight = model.get_submodule(name).weight
    for window in ids:
        model.zero_grad()
        model(input_ids=window[None], labels=window[None]).loss.backward()
        expected += weight.grad.square()
    torch.testing.assert_close(fisher, expected, rtol=1e-5, atol=1e-12)
    assert not any(p.requires_grad is False for p in model.parameters())  # left as it was found


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_mixed_widths_quantize_save_and_load(tmp_path, method):
    model = tiny_model()
    ids = calib()
    base = gptq() if method == "gptq" else QuantConfig(bits=3, group_size=32)
    average = base.effective_bits(64) + 0.3
    mixed = choose_widths(model, base, average, ids)
    assert mixed.average_bits <= average + 1e-9
    assert len({(o.bits, o.group_size) for o in mixed.choice.values()}) > 1, "the budget should mix settings"
    config = mixed.config
    q = bitcliff.quantize(copy.deepcopy(model), config, progress=False, calib_ids=ids)
    layers = {n: m for n, m in q.named_modules() if isinstance(m, QuantLinear)}
    for name, option in mixed.choice.items():
        assert (layers[name].bits, layers[name].group_size) == (option.bits, option.group_size), name
    stored = sum(m.in_features * m.out_features * config.for_module(n).effective_bits(m.in_features)
                 for n, m in layers.items()) / sum(m.in_features * m.out_features for m in layers.values())
    assert stored == pytest.approx(mixed.average_bits)
    overrides = module_overrides(q, config)
    assert set(overrides) == {name for name, _, _ in config.module_widths}
    bitcliff.save(q, tmp_path / "q", overwrite=True)
    loaded = bitcliff.load(tmp_path / "q")
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids[:2]).logits, q(ids[:2]).logits)
    loaded_layers = {n: m for n, m in loaded.named_modules() if isinstance(m, QuantLinear)}
    assert {n: (m.bits, m.group_size) for n, m in loaded_layers.items()} == \
        {n: (m.bits, m.group_size) for n, m in layers.items()}


def test_gptq_with_module_widths_solves_each_width_as_alone():
    """A share group split by width: each member solved on the group's Hessian, as a model
    quantized at that member's width throughout would solve it (rows are independent)."""
    model = tiny_model()
    ids = calib()
    name = "model.layers.0.self_attn.k_proj"
    mixed = gptq(module_widths=((name, 4, 32),))
    plain4 = gptq(bits=4, group_size=32, true_sequential=mixed.true_sequential)
    a = bitcliff.quantize(copy.deepcopy(model), mixed, progress=False, calib_ids=ids)
    b = bitcliff.quantize(copy.deepcopy(model), plain4, progress=False, calib_ids=ids)
    qa, qb = a.get_submodule(name), b.get_submodule(name)
    assert (qa.bits, qa.group_size) == (4, 32)
    torch.testing.assert_close(qa.dequantize(), qb.dequantize())  # layer 0: the same inputs
    other = a.get_submodule("model.layers.0.self_attn.q_proj")
    assert (other.bits, other.group_size) == (mixed.bits, mixed.group_size)


def test_module_widths_are_checked_and_named():
    with pytest.raises(ValueError, match="module_widths entry of model.x: bits"):
        QuantConfig(module_widths=(("model.x", 5, 64),))
    with pytest.raises(ValueError, match="module_widths entries are"):
        QuantConfig(module_widths=(("model.x", 4),))
    config = QuantConfig(bits=3, module_widths=[["a", 4, 128]])
    assert config.for_module("a").bits == 4 and config.for_module("b").bits == 3
    assert QuantConfig.from_dict(config.to_dict()) == config
