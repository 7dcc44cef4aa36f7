"""Every model family of ``bitcliff.layers.ARCHITECTURES``, as a tiny random model built from its
config, through quantization (RTN and GPTQ), save and load, evaluation, diagnosis and repair."""

from __future__ import annotations

import copy

import pytest
import torch

import bitcliff
from bitcliff import QuantConfig
from bitcliff.diagnosis.run import DiagnoseOptions
from bitcliff.eval import evaluate_ppl
from bitcliff.layers import ARCHITECTURES, architecture_of, component, find_decoder_layers
from tests.conftest import tiny_llama_config

VOCAB = 128


def _llama():
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM(tiny_llama_config())


def _gemma3():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    return Gemma3ForCausalLM(Gemma3TextConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, vocab_size=VOCAB, sliding_window=8, layer_types=["sliding_attention", "full_attention"]))


def _bloom():
    from transformers import BloomConfig, BloomForCausalLM

    return BloomForCausalLM(BloomConfig(vocab_size=VOCAB, hidden_size=64, n_layer=2, n_head=4))


def _gpt_neox():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    return GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, intermediate_size=128,
                                            max_position_embeddings=64))


def _phi3():
    from transformers import Phi3Config, Phi3ForCausalLM

    return Phi3ForCausalLM(Phi3Config(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=96, max_position_embeddings=64,
                                      pad_token_id=0, eos_token_id=1, bos_token_id=2))


#: One model per family (Gemma 3 and Phi-3 are the Llama family's entry: other norms, fused projections).
FAMILIES = {"llama": _llama, "gemma3_text": _gemma3, "bloom": _bloom, "gpt_neox": _gpt_neox, "phi3": _phi3}


def test_every_family_has_a_model_here():
    assert {t for a in ARCHITECTURES for t in a.model_types} >= {"llama", "gemma3_text", "bloom", "gpt_neox", "phi3"}
    assert {architecture_of(FAMILIES[name]()).model_types[0] for name in FAMILIES} == \
        {a.model_types[0] for a in ARCHITECTURES}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_family_is_quantized_saved_diagnosed_and_repaired(family, tmp_path):
    torch.manual_seed(0)
    fp = FAMILIES[family]().eval()
    assert fp.config.model_type == family
    ids = torch.randint(0, VOCAB, (8, 32), generator=torch.Generator().manual_seed(1))
    for method in ("rtn", "gptq"):
        config = QuantConfig(bits=2, group_size=32, method=method, calib_samples=4)
        q = bitcliff.quantize(copy.deepcopy(fp), config, calib_ids=ids if method == "gptq" else None, progress=False)
        loaded = bitcliff.load(bitcliff.save(q, tmp_path / method))
        with torch.no_grad():
            assert torch.equal(q(ids[:2]).logits, loaded(ids[:2]).logits), method
    ppl = evaluate_ppl(loaded, ids[:2], progress=False)["ppl"]
    assert ppl == ppl and ppl > 1

    report = bitcliff.diagnose(fp, loaded, ids[:4], options=DiagnoseOptions.fast(), progress=False)
    layers = report.to_dict()["components"]["function"]["local"]
    assert all(len(values) == 2 for values in layers.values())  # both components of both layers assessed
    plan = bitcliff.plan_repair(report, 2.0, methods=["restore", "lowrank", "norm", "bias"])
    result = bitcliff.repair(fp, loaded, ids, plan, progress=False)
    assert result.record.modules and result.bits_per_weight > 0, "the repair did nothing"
    reloaded = bitcliff.load(bitcliff.save(loaded, tmp_path / "repaired", extra_files=result.files()))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids[:2]).logits, loaded(ids[:2]).logits, rtol=1e-4, atol=1e-4)
    first = find_decoder_layers(reloaded)[1][0]
    assert component(first, "attn") is getattr(first, architecture_of(reloaded).attention)
