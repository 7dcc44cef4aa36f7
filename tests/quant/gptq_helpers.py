"""Shared pieces of the GPTQ tests: a tiny Llama, calibration windows, tensor comparisons."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from bitcliff.quant.config import QuantConfig
from bitcliff.quant.qlinear import QuantLinear

N_WINDOWS, SEQ = 6, 24


def tiny_model(**overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    values = dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**{**values, **overrides})).eval()


def calib(n: int = N_WINDOWS, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (n, SEQ), generator=torch.Generator().manual_seed(seed))


def gptq(**kw) -> QuantConfig:
    kw.setdefault("bits", 3)
    kw.setdefault("group_size", 32)
    kw.setdefault("calib_samples", N_WINDOWS)
    return QuantConfig.paper_gptq(**kw)


def quant_tensors(model) -> dict[str, torch.Tensor]:
    return {
        f"{n}.{k}": getattr(m, k)
        for n, m in model.named_modules()
        if isinstance(m, QuantLinear)
        for k in ("qweight", "qzeros", "scales", "g_idx")
    }


def folder_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not different, different[:5]
