"""Quantizing on load through transformers: the same model as bitcliff.quantize, saved as a GPTQ
checkpoint that bitcliff reads back."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import bitcliff
from bitcliff import BitcliffConfig


def _ids():
    return torch.randint(0, 120, (2, 20), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_from_pretrained_quantizes_like_bitcliff(tiny_folder, tmp_path, method):
    text = (tiny_folder.parent / "text.txt").read_text()
    settings = dict(bits=3, group_size=32, method=method)
    extra = dict(calibration_text=text, seq_len=32, calib_samples=4) if method == "gptq" else {}
    model = AutoModelForCausalLM.from_pretrained(tiny_folder, quantization_config=BitcliffConfig(**settings, **extra))
    assert type(model.model.layers[0].mlp.up_proj).__name__ == "QuantLinear"

    reference = AutoModelForCausalLM.from_pretrained(tiny_folder)
    config = bitcliff.QuantConfig(**settings, **({"calib_samples": 4} if method == "gptq" else {}))
    if method == "gptq":
        from bitcliff.data import calibration_windows
        from bitcliff.models import load_fp_model

        _, tokenizer, _ = load_fp_model(str(tiny_folder))
        bitcliff.quantize(reference, config, calib_ids=calibration_windows(tokenizer, text, 4, 32))
    else:
        bitcliff.quantize(reference, config)
    with torch.no_grad():
        assert torch.equal(model(_ids()).logits, reference(_ids()).logits)

    model.save_pretrained(tmp_path / "saved")
    qc = json.loads((tmp_path / "saved" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "gptq" and qc["checkpoint_format"] == "gptq_v2" and qc["bits"] == 3
    back = bitcliff.load(tmp_path / "saved")
    with torch.no_grad():
        assert torch.equal(back(_ids()).logits, reference(_ids()).logits)


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="group_size must be -1"):
        BitcliffConfig(bits=3, group_size=7)
    with pytest.raises(ValueError, match="needs calibration_text"):
        BitcliffConfig(bits=3, method="gptq")
    with pytest.raises(ValueError, match=r"unknown settings \['colour'\]"):
        BitcliffConfig(bits=3, colour="blue")


def test_a_folder_declaring_bitcliff_is_sent_to_bitcliff_load(tiny_folder, tmp_path):
    import shutil

    folder = tmp_path / "declared"
    shutil.copytree(tiny_folder, folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = BitcliffConfig(bits=4).to_dict()
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="load them with bitcliff.load"):
        AutoModelForCausalLM.from_pretrained(folder)
