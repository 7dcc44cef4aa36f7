"""Checkpoints: bit-exact round trips, v1/v2, and every broken-folder case gets a clear error."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import bitcliff
from bitcliff import QuantConfig
from bitcliff.kernels.pack import pack_qzeros, unpack_qzeros
from bitcliff.quant.checkpoint import CheckpointError, load, save
from bitcliff.quant.qlinear import QuantLinear
from bitcliff.storage import MANIFEST


def _quantized(model, bits=3, group_size=32, sym=False):
    return bitcliff.quantize(model, QuantConfig(bits=bits, group_size=group_size, sym=sym), progress=False)


def _quant_buffers(model):
    return {
        f"{n}.{k}": getattr(m, k)
        for n, m in model.named_modules()
        if isinstance(m, QuantLinear)
        for k in ("qweight", "qzeros", "scales", "g_idx")
    }


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("sym", [False, True])
def test_round_trip_is_bit_exact(tiny_llama, tmp_path, bits, sym):
    model = _quantized(tiny_llama, bits=bits, sym=sym)
    path = save(model, tmp_path / "ck", dtype=torch.float32)
    loaded = load(path)
    a, b = _quant_buffers(model), _quant_buffers(loaded)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ids = torch.randint(0, 128, (2, 10))
    assert torch.equal(model(ids).logits, loaded(ids).logits)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "gptq" and qc["bits"] == bits and qc["sym"] is sym


def test_skipped_linears_are_named_full_precision_for_other_readers(tiny_llama, tmp_path):
    """A GPTQ reader takes every linear but the head as quantized unless ``dynamic`` says otherwise:
    a module ``skip_modules`` kept in full precision gets a ``-:`` rule, the head none."""
    model = bitcliff.quantize(tiny_llama, QuantConfig(bits=3, group_size=32, skip_modules=("lm_head", "*.k_proj")),
                              progress=False)
    path = save(model, tmp_path / "ck", dtype=torch.float32)
    dynamic = json.loads((path / "config.json").read_text())["quantization_config"]["dynamic"]
    assert sorted(dynamic) == [f"-:^model\\.layers\\.{i}\\.self_attn\\.k_proj$" for i in range(2)]
    loaded = load(path)
    assert type(loaded.model.layers[0].self_attn.k_proj) is torch.nn.Linear
    ids = torch.randint(0, 128, (2, 10))
    assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_format_choice_v1_for_symmetric_v2_for_asymmetric(tiny_llama, tmp_path):
    sym = save(_quantized(tiny_llama, bits=3, sym=True), tmp_path / "sym")
    assert json.loads((sym / "config.json").read_text())["quantization_config"]["checkpoint_format"] == "gptq"


def test_v2_when_a_zero_is_zero(tiny_llama, tmp_path):
    model = _quantized(tiny_llama, bits=2)
    layer = model.model.layers[0].mlp.up_proj
    zeros = unpack_qzeros(layer.qzeros, 2, layer.out_features)
    zeros[0, 0] = 0  # a group whose weights are all >= 0 has zero point 0
    layer.qzeros.copy_(pack_qzeros(zeros, 2))
    path = save(model, tmp_path / "auto")
    assert json.loads((path / "config.json").read_text())["quantization_config"]["checkpoint_format"] == "gptq_v2"
    assert torch.equal(load(path).model.layers[0].mlp.up_proj.qzeros, layer.qzeros)
    with pytest.raises(ValueError, match="zero point 0"):
        save(model, tmp_path / "v1", checkpoint_format="gptq")


def test_v1_stores_zero_minus_one(tiny_llama, tmp_path):
    model = _quantized(tiny_llama, bits=4, sym=True)
    path = save(model, tmp_path / "ck", checkpoint_format="gptq")
    raw = load_file(path / "model.safetensors")
    stored = unpack_qzeros(raw["model.layers.0.self_attn.q_proj.qzeros"], 4, 64)
    assert (stored == 7).all()  # symmetric 4-bit zero point 8, stored minus one
    v2 = save(model, tmp_path / "v2", checkpoint_format="gptq_v2")
    assert torch.equal(_quant_buffers(load(path))["model.layers.0.self_attn.q_proj.qzeros"],
                       _quant_buffers(load(v2))["model.layers.0.self_attn.q_proj.qzeros"])


def test_sharded_checkpoint_and_missing_shard(tiny_llama, tmp_path):
    model = _quantized(tiny_llama)
    path = save(model, tmp_path / "ck", max_shard_bytes=20_000, dtype=torch.float32)
    shards = sorted(path.glob("model-*.safetensors"))
    assert len(shards) > 1 and (path / "model.safetensors.index.json").exists()
    ids = torch.randint(0, 128, (1, 8))
    assert torch.equal(load(path)(ids).logits, model(ids).logits)
    shards[1].unlink()
    with pytest.raises(CheckpointError, match=f"lacks {shards[1].name}, which bitcliff wrote there"):
        load(path)
    (path / MANIFEST).unlink()  # as a peer's checkpoint: the index names the missing shard
    with pytest.raises(CheckpointError, match=f"missing: {shards[1].name}"):
        load(path)


def test_truncated_file(tiny_llama, tmp_path):
    path = save(_quantized(tiny_llama), tmp_path / "ck")
    f = path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors could not be read"):
        load(path)


@pytest.mark.parametrize("field,value,message", [
    ("bits", 4, r"qweight has shape .* config bits=4"),
    ("group_size", 64, r"scales has \d groups, but config group_size=64"),
    ("bits", 8, "bits=8"),
    ("quant_method", "awq", "not a GPTQ checkpoint"),
])
def test_config_disagreeing_with_tensors(tiny_llama, tmp_path, field, value, message):
    path = save(_quantized(tiny_llama, bits=3, group_size=32), tmp_path / "ck")
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"][field] = value
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=message):
        load(path)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError, match="not a GPTQ checkpoint"):
        load(tmp_path)


def test_refuses_existing_checkpoint_and_overwrites_atomically(tiny_llama, tmp_path, monkeypatch):
    model = _quantized(tiny_llama)
    path = save(model, tmp_path / "ck")
    before = (path / "model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="already exists and is not empty; pass overwrite=True"):
        save(model, path)

    # a failure in the middle of writing leaves the old checkpoint untouched, no temp folder
    def broken_save_file(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", broken_save_file)
    with pytest.raises(OSError, match="disk full"):
        save(model, path, overwrite=True)
    assert (path / "model.safetensors").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["ck"]
    monkeypatch.undo()
    save(model, path, overwrite=True, checkpoint_format="gptq_v2")
    assert json.loads((path / "config.json").read_text())["quantization_config"]["checkpoint_format"] == "gptq_v2"
    assert sorted(os.listdir(tmp_path)) == ["ck"]


def test_unquantized_model_is_refused(tiny_llama, tmp_path):
    with pytest.raises(ValueError, match="not quantized"):
        save(tiny_llama, tmp_path / "ck")


def test_peer_style_tensor_without_module(tiny_llama, tmp_path):
    path = save(_quantized(tiny_llama), tmp_path / "ck")
    tensors = load_file(path / "model.safetensors")
    tensors["model.layers.9.mlp.up_proj.qweight"] = tensors["model.layers.0.mlp.up_proj.qweight"].clone()
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(CheckpointError, match="layers.9.mlp.up_proj.qweight names no module"):
        load(path)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_v1_reading_inverts_word_wide_subtraction(bits):
    """GPTQModel writes v1 by subtracting 1 from every code of a packed word at once; a zero
    point of 0 then borrows from its neighbour.  Reading must undo exactly that."""
    from bitcliff.quant.checkpoint import v1_to_v2_qzeros

    torch.manual_seed(bits)
    zeros = torch.randint(0, 2**bits, (5, 64), dtype=torch.int32)
    zeros[:, ::7] = 0
    v2 = pack_qzeros(zeros, bits)
    if bits == 3:  # no word-wide convention for straddling codes: v1 is written code by code
        v1 = pack_qzeros((zeros - 1) & 7, 3)
    else:
        ones = sum(1 << s for s in range(0, 32, bits))
        words = (v2.to(torch.int64) - ones) & 0xFFFFFFFF
        v1 = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    assert torch.equal(v1_to_v2_qzeros(v1, bits, 64), v2)
