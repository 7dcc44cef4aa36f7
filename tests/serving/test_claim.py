"""Which checkpoints the serving path claims (no engine needed)."""

from __future__ import annotations

import pytest

from bitcliff.serving.claim import UnsupportedCheckpoint, claim, side_files


def bitcliff_qc(bits=3, sym=False, fmt="gptq_v2", desc_act=False, **extra):
    return {"quant_method": "gptq", "bits": bits, "group_size": 64, "sym": sym, "desc_act": desc_act,
            "checkpoint_format": fmt, "meta": {"quantizer": ["bitcliff:0.1.0"], "bitcliff": {"bits": bits}}, **extra}


def peer_qc(bits=4, sym=True, desc_act=False, **extra):
    return {"quant_method": "gptq", "bits": bits, "group_size": 128, "sym": sym, "desc_act": desc_act, **extra}


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_bitcliff_asymmetric_checkpoints_are_claimed_at_every_width(bits):
    decision = claim(bitcliff_qc(bits=bits))
    assert decision.ours and "asymmetric" in decision.reason


@pytest.mark.parametrize("bits", [2, 3])
def test_symmetric_low_widths_are_claimed(bits):
    assert claim(bitcliff_qc(bits=bits, sym=True, fmt="gptq")).ours
    assert claim(peer_qc(bits=bits)).ours


def test_symmetric_4bit_without_extras_is_left_to_the_engine():
    assert not claim(bitcliff_qc(bits=4, sym=True, fmt="gptq")).ours
    assert not claim(peer_qc(bits=4)).ours
    assert not claim(peer_qc(bits=8)).ours


def test_act_order_and_v2_and_dynamic_widths_are_claimed_at_4bit():
    assert "act-order" in claim(peer_qc(desc_act=True)).reason
    assert not claim(peer_qc(desc_act=True, group_size=-1)).ours  # one group: act-order is a no-op
    assert claim(bitcliff_qc(bits=4, sym=True, fmt="gptq_v2")).ours
    dynamic = {"+:^model\\.layers\\.0\\.mlp\\.down_proj$": {"bits": 2, "group_size": 64}}
    assert claim(peer_qc(dynamic=dynamic)).ours
    assert not claim(peer_qc(dynamic={"-:^lm_head$": {}})).ours


def test_other_methods_and_widths_are_not_claimed():
    assert not claim({"quant_method": "awq", "bits": 4}).ours
    assert not claim(peer_qc(bits=8, sym=False)).ours  # not a width bitcliff runs
    with pytest.raises(UnsupportedCheckpoint, match="bits=8"):
        claim(bitcliff_qc(bits=8))


@pytest.mark.parametrize("name", ["lowrank.safetensors", "outliers.safetensors", "adapter_model.safetensors"])
def test_repair_side_files_are_claimed_whatever_the_width(tmp_path, name):
    (tmp_path / name).write_bytes(b"x")
    assert side_files(tmp_path) == [name]
    assert claim(peer_qc(bits=4), tmp_path).ours  # never left to an engine that would drop them


def test_a_clean_folder_or_a_hub_id_has_no_side_files(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"x")
    assert side_files(tmp_path) == []
    assert side_files("org/model-on-the-hub") == []
    assert side_files(None) == []
