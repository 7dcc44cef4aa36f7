"""Per-layer settings of served layers, fused ones included (no engine needed)."""

from __future__ import annotations

import pytest

from bitcliff.quant.dynamic import dynamic_entries
from bitcliff.serving.claim import UnsupportedCheckpoint
from bitcliff.serving.settings import LayerSettings, layer_settings, module_settings, shard_names

PACKED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
ATTN = "model.layers.1.self_attn"


def qc(dynamic=None):
    return {"quant_method": "gptq", "bits": 3, "group_size": 64, "dynamic": dynamic}


def test_shard_names_follow_the_packed_mapping():
    assert shard_names(f"{ATTN}.qkv_proj", PACKED) == [f"{ATTN}.q_proj", f"{ATTN}.k_proj", f"{ATTN}.v_proj"]
    assert shard_names(f"{ATTN}.o_proj", PACKED) == [f"{ATTN}.o_proj"]


def test_per_module_rules_reach_the_fused_layer():
    # bitcliff writes one anchored rule per module, as a repair's restored modules get them
    dynamic = dynamic_entries({f"{ATTN}.{p}": (4, 128) for p in ("q_proj", "k_proj", "v_proj")})
    assert layer_settings(qc(dynamic), f"{ATTN}.qkv_proj", PACKED) == (LayerSettings(4, 128),) * 3
    assert layer_settings(qc(dynamic), "model.layers.0.self_attn.qkv_proj", PACKED) == (LayerSettings(3, 64),) * 3
    assert layer_settings(qc(dynamic), f"{ATTN}.o_proj", PACKED) == (LayerSettings(3, 64),)


def test_fused_shards_keep_their_own_widths():
    dynamic = dynamic_entries({f"{ATTN}.q_proj": (4, 128), f"{ATTN}.k_proj": (2, 32)})
    assert layer_settings(qc(dynamic), f"{ATTN}.qkv_proj", PACKED) == (
        LayerSettings(4, 128), LayerSettings(2, 32), LayerSettings(3, 64))


def test_a_fused_layer_keeps_its_full_precision_shards_apart():
    dynamic = dynamic_entries({f"{ATTN}.k_proj": (4, 64), f"{ATTN}.v_proj": (16, -1)})
    assert layer_settings(qc(dynamic), f"{ATTN}.qkv_proj", PACKED) == (LayerSettings(3, 64), LayerSettings(4, 64), None)
    fp = dynamic_entries({f"{ATTN}.{p}": (16, -1) for p in ("q_proj", "k_proj", "v_proj")})
    assert layer_settings(qc(fp), f"{ATTN}.qkv_proj", PACKED) is None


def test_full_precision_layers_and_bad_widths():
    dynamic = dynamic_entries({f"{ATTN}.o_proj": (16, -1)})
    assert module_settings(qc(dynamic), f"{ATTN}.o_proj") is None
    with pytest.raises(UnsupportedCheckpoint, match="bits=8"):
        module_settings(qc({"+:.*down_proj": {"bits": 8}}), "model.layers.0.mlp.down_proj")
