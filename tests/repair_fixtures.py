"""The tiny model the repair tests repair (shared with the rank workers, which import it by name)."""

from __future__ import annotations

import torch


def repair_setup():
    """``(fp, quantized, calib)``: a seeded 2-layer Llama, its RTN W2 g32 copy, 8 windows of 32 tokens."""
    import copy

    from transformers import LlamaConfig, LlamaForCausalLM

    import bitcliff

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=128, tie_word_embeddings=True,
                         initializer_range=0.1)
    fp = LlamaForCausalLM(config).eval()
    calib = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(1))
    q = bitcliff.quantize(copy.deepcopy(fp), bitcliff.QuantConfig(bits=2, group_size=32), progress=False)
    return fp, q, calib
