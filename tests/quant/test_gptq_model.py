"""Whole-model GPTQ in memory: layer-wise orchestration, the log, errors, the head outside the layers."""

from __future__ import annotations

import json

import pytest
import torch
from gptq_helpers import N_WINDOWS, SEQ, calib, gptq, tiny_model
from torch import nn

import bitcliff
from bitcliff.quant.checkpoint import save
from bitcliff.quant.config import QuantConfig
from bitcliff.quant.gptq_model import gptq_log, quantize_gptq
from bitcliff.quant.qlinear import QuantLinear
from bitcliff.quant.surgery import quant_config


@pytest.mark.parametrize("true_sequential", [False, True])
def test_quantize_gptq_converts_every_decoder_linear(true_sequential):
    model = tiny_model()
    ids = calib()
    with torch.no_grad():
        fp_logits = model(ids).logits
    out = quantize_gptq(model, gptq(true_sequential=true_sequential), progress=False, calib_ids=ids, batch_size=4)
    assert out is model and quant_config(model).method == "gptq"
    names = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    assert len(names) == 14 and all(n.startswith("model.layers.") for n in names)
    assert type(model.lm_head) is nn.Linear  # skipped by default
    log = gptq_log(model)
    assert [e.module for e in log] == names
    first = log[0]
    assert first.group == [f"model.layers.0.self_attn.{p}_proj" for p in "qkv"]
    assert first.damp_percent == 0.01 and first.fallback is None and first.tokens == N_WINDOWS * SEQ
    assert all(e.loss > 0 and e.seconds >= 0 for e in log)
    with torch.no_grad():
        q_logits = model(ids).logits
    assert torch.isfinite(q_logits).all()
    assert (q_logits - fp_logits).abs().mean() < 0.5 * fp_logits.abs().mean()


def test_gptq_output_error_is_below_rtn():
    ids = calib(8)
    fp = tiny_model(initializer_range=0.1)
    with torch.no_grad():
        ref = fp(ids).logits
    errors = {}
    for method in ("rtn", "gptq"):
        model = tiny_model(initializer_range=0.1)
        config = QuantConfig(bits=3, group_size=32, method=method, calib_samples=8)
        bitcliff.quantize(model, config, progress=False, calib_ids=ids)
        with torch.no_grad():
            errors[method] = float(((model(ids).logits - ref) ** 2).mean())
    assert errors["gptq"] < 0.8 * errors["rtn"]


def test_refit_rounds_lower_the_model_output_error_and_are_logged():
    ids = calib(8)
    fp = tiny_model(initializer_range=0.1)
    with torch.no_grad():
        ref = fp(ids).logits
    errors, logs = {}, {}
    for rounds in (0, 2):
        model = tiny_model(initializer_range=0.1)
        config = gptq(bits=2, calib_samples=8, true_sequential=True, refit_rounds=rounds)
        quantize_gptq(model, config, progress=False, calib_ids=ids)
        with torch.no_grad():
            errors[rounds] = float(((model(ids).logits - ref) ** 2).mean())
        logs[rounds] = gptq_log(model)
    assert errors[2] < errors[0]
    assert all(e.refit_rows is None for e in logs[0])
    assert all(0 < e.refit_rows <= 1 for e in logs[2])


def test_calibration_input_errors():
    model = tiny_model()
    for bad, match in [
        (None, "needs calibration data"),
        (torch.empty(0, SEQ, dtype=torch.long), "non-empty"),
        (torch.zeros(SEQ, dtype=torch.long), "non-empty"),
        (torch.zeros(3, SEQ), "integer tensor"),
        (calib(2), "holds 2 windows but config.calib_samples=6"),
    ]:
        with pytest.raises(ValueError, match=match):
            quantize_gptq(model, gptq(), progress=False, calib_ids=bad)
    with pytest.raises(ValueError, match="method='gptq'"):
        quantize_gptq(model, QuantConfig(method="rtn"), calib_ids=calib())
    assert not any(isinstance(m, QuantLinear) for m in model.modules())  # nothing half-done


def test_head_outside_the_layers_gets_rtn_with_a_warning():
    model = tiny_model(tie_word_embeddings=False)
    with pytest.warns(RuntimeWarning, match="lm_head lies outside the decoder layers"):
        quantize_gptq(model, gptq(skip_modules=()), progress=False, calib_ids=calib())
    assert isinstance(model.lm_head, QuantLinear)
    assert gptq_log(model)[-1].module == "lm_head" and gptq_log(model)[-1].fallback


def test_the_log_is_saved_with_the_checkpoint(tmp_path):
    model = quantize_gptq(tiny_model(), gptq(), progress=False, calib_ids=calib())
    save(model, tmp_path / "ckpt")
    written = json.loads((tmp_path / "ckpt" / "gptq_log.json").read_text())
    assert written == [e.to_dict() for e in gptq_log(model)]
    assert not list(tmp_path.glob(".*"))  # no temporary file left beside it


def test_unknown_quantize_arguments_are_named():
    with pytest.raises(TypeError, match="unexpected keyword arguments: calib"):
        bitcliff.quantize(tiny_model(), QuantConfig(bits=3, group_size=32), calib=calib())
