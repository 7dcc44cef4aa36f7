"""BLOOM, a model of the research this project builds on: its blocks return a tuple the model
unpacks (``outputs[0]``), where Llama's return the tensor.  GPTQ walks it layer by layer, and its
checkpoint loads back to the same outputs."""

from __future__ import annotations

import copy

import pytest
import torch

import bitcliff
from bitcliff import QuantConfig


@pytest.fixture(scope="module")
def tiny_bloom():
    from transformers import BloomConfig, BloomForCausalLM

    torch.manual_seed(0)
    return BloomForCausalLM(BloomConfig(vocab_size=128, hidden_size=64, n_layer=2, n_head=4)).eval()


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_bloom_is_quantized_saved_and_loaded(tiny_bloom, method, tmp_path):
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1))
    config = QuantConfig(bits=4, group_size=32, method=method, calib_samples=4)
    model = bitcliff.quantize(copy.deepcopy(tiny_bloom), config, calib_ids=ids if method == "gptq" else None,
                              progress=False)
    names = {name for name, m in model.named_modules() if isinstance(m, bitcliff.QuantLinear)}
    assert "transformer.h.1.self_attention.query_key_value" in names and "transformer.h.0.mlp.dense_4h_to_h" in names
    with torch.no_grad():
        before = model(input_ids=ids).logits
        assert torch.isfinite(before).all()
        bitcliff.save(model, tmp_path / "q")
        torch.testing.assert_close(bitcliff.load(tmp_path / "q")(input_ids=ids).logits, before, rtol=1e-3, atol=1e-3)
        fp = tiny_bloom(input_ids=ids).logits
    assert float((before - fp).abs().max()) < float(fp.abs().max())  # 4 bits: near the fp model, not equal
