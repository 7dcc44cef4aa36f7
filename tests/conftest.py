"""Shared fixtures: tiny random models for fast tests, the embedded model for real ones."""

from __future__ import annotations

import pytest
import torch


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    values = dict(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    values.update(overrides)
    return LlamaConfig(**values)


@pytest.fixture
def tiny_llama():
    """A random 2-layer Llama (hidden 64) in eval mode, seeded."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config()).eval()
