"""Finding decoder layers, recording what they receive, and replaying them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bitcliff.layers import (
    LayerCalls,
    StopForward,
    UnsupportedModelError,
    find_decoder_layers,
    layer_index,
    run_layers,
)


def _gemma3():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, vocab_size=128, sliding_window=8,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
    )
    return Gemma3ForCausalLM(config).eval()


def _ids(n=4, t=24):
    return torch.randint(0, 128, (n, t), generator=torch.Generator().manual_seed(0))


def test_unsupported_model_structure_is_named():
    with pytest.raises(UnsupportedModelError, match="cannot find the decoder layers of Sequential"):
        find_decoder_layers(nn.Sequential(nn.Linear(4, 4)))


def test_layer_index():
    assert layer_index("model.layers.11.mlp.down_proj", "model.layers") == 11
    assert layer_index("lm_head", "model.layers") is None
    assert layer_index("model.layers_extra.1.x", "model.layers") is None


def test_gemma3_layers_get_their_own_masks_and_rotary_embeddings():
    """Gemma 3 alternates sliding and global layers with different masks and RoPE bases: the
    recorded per-layer calls must reproduce the model's own forward exactly."""
    model, ids = _gemma3(), _ids()
    _, layers = find_decoder_layers(model)
    recorded = LayerCalls(layers)
    with recorded.replacing(), torch.no_grad(), pytest.raises(StopForward):
        model(ids, use_cache=False)
    calls = recorded.for_forward(0)
    assert calls[0].kwargs["position_embeddings"][0] is not calls[1].kwargs["position_embeddings"][0]
    assert all(len(per_layer) == 0 for per_layer in recorded.inputs[1:])  # layers replaced: only layer 0
    with torch.no_grad():
        expected = model(ids, output_hidden_states=True).hidden_states
        hidden = recorded.inputs[0][0]
        for i, layer in enumerate(layers):
            assert torch.equal(hidden, expected[i])
            hidden = run_layers([layer], [calls[i]], hidden)
    assert not any(type(m).__name__ == "_PassThrough" for m in model.modules())  # layers put back


def test_observing_records_every_layer_input_and_replays_exactly():
    model, ids = _gemma3(), _ids(1)
    _, layers = find_decoder_layers(model)
    recorded = LayerCalls(layers)
    with recorded.observing(), torch.no_grad():
        model(ids, use_cache=False, output_hidden_states=True)
    assert all(m._forward_pre_hooks == {} for m in layers)  # hooks removed
    calls = recorded.for_forward(0)
    with torch.no_grad():
        for start in range(len(layers)):
            out = run_layers(layers, calls, recorded.inputs[start][0], start)
            torch.testing.assert_close(out, run_layers(layers, calls, recorded.inputs[0][0]), rtol=0, atol=0)


def test_a_model_that_does_not_chain_its_layers_is_refused():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.Identity(), nn.Identity()])

        def forward(self, x):
            return self.layers[1](self.layers[0](x) * 2)

    class UnpacksThenDoubles(Twice):  # layers that return a tuple, as BLOOM's do
        def forward(self, x):
            return self.layers[1](self.layers[0](x)[0] * 2)

    for model in (Twice(), UnpacksThenDoubles()):
        recorded = LayerCalls(model.layers)
        with recorded.replacing(), pytest.raises(UnsupportedModelError, match="does not pass each decoder layer's output"):
            model(torch.ones(1, 2, 3))


def test_share_groups_name_the_module_that_feeds_them():
    from bitcliff.layers import share_groups

    model, ids = _gemma3(), _ids(1)
    _, layers = find_decoder_layers(model)
    recorded = LayerCalls(layers)
    with recorded.observing(), torch.no_grad():
        model(ids, use_cache=False)
    layer = layers[0]
    targets = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
    groups = share_groups(layer, targets, recorded.inputs[0][0], recorded.for_forward(0)[0])
    assert [(g.members, g.source) for g in groups] == [
        (["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], "input_layernorm"),
        (["self_attn.o_proj"], None),
        (["mlp.gate_proj", "mlp.up_proj"], "pre_feedforward_layernorm"),  # Gemma 3's norm names
        (["mlp.down_proj"], None),
    ]
