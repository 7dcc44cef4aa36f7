"""Streaming GPTQ: one layer in memory, bit-identical to in-memory, interruption and resume."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest
import torch
from gptq_helpers import (
    assert_same_tensors,
    calib,
    folder_tensors,
    gptq,
    quant_tensors,
    tiny_model,
)

from bitcliff.quant import gptq_stream
from bitcliff.quant.checkpoint import load, save
from bitcliff.quant.gptq_model import gptq_log, quantize_gptq
from bitcliff.quant.gptq_stream import quantize_gptq_streaming


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("src") / "tiny"
    tiny_model().save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    "settings", [dict(), dict(true_sequential=True, act_order=True, refit_rounds=2)]
)
def test_streaming_equals_in_memory_bit_for_bit(source, tmp_path, settings):
    from transformers import AutoModelForCausalLM

    config, ids = gptq(**settings), calib()
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    quantize_gptq(model, config, progress=False, calib_ids=ids, batch_size=4)
    save(model, tmp_path / "memory", checkpoint_format="gptq_v2")
    out = quantize_gptq_streaming(source, config, ids, tmp_path / "stream", progress=False, batch_size=4)
    assert_same_tensors(folder_tensors(tmp_path / "memory"), folder_tensors(out))

    assert not (tmp_path / "stream.partial").exists()
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["checkpoint_format"] == "gptq_v2" and qc["bits"] == 3 and qc["desc_act"] == config.act_order
    assert (out / "tokenizer.json").exists() or not (source / "tokenizer.json").exists()
    log = json.loads((out / "gptq_log.json").read_text())
    assert [e["module"] for e in log] == [e.module for e in gptq_log(model)]
    loaded = load(out)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=0.05, rtol=0.05)


def test_interrupted_run_resumes_to_the_same_result(source, tmp_path, monkeypatch):
    config, ids = gptq(true_sequential=True), calib()
    whole = quantize_gptq_streaming(source, config, ids, tmp_path / "whole", progress=False, batch_size=4)

    real = gptq_stream.quantize_decoder_layer

    def crash_at_layer_1(layer, name, *rest):
        if name == "model.layers.1":
            raise KeyboardInterrupt
        return real(layer, name, *rest)

    monkeypatch.setattr(gptq_stream, "quantize_decoder_layer", crash_at_layer_1)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        quantize_gptq_streaming(source, config, ids, out, progress=False, batch_size=4)
    work = tmp_path / "resumed.partial"
    assert not out.exists()
    assert json.loads((work / "progress.json").read_text())["layers_done"] == 1
    finished = os.stat(work / "layer-00000.safetensors")

    calls = []
    monkeypatch.setattr(gptq_stream, "quantize_decoder_layer", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    quantize_gptq_streaming(source, config, ids, out, progress=False, batch_size=4)
    assert calls == ["model.layers.1"]  # layer 0 was not redone
    again = os.stat(out / "layer-00000.safetensors")
    assert (again.st_ino, again.st_mtime_ns) == (finished.st_ino, finished.st_mtime_ns)  # never rewritten
    assert_same_tensors(folder_tensors(whole), folder_tensors(out))
    def without_times(path):
        return [{k: v for k, v in e.items() if k != "seconds"} for e in json.loads(path.read_text())]

    assert without_times(out / "gptq_log.json") == without_times(whole / "gptq_log.json")


def test_resume_refuses_other_settings(source, tmp_path, monkeypatch):
    ids = calib()
    monkeypatch.setattr(gptq_stream, "quantize_decoder_layer", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        quantize_gptq_streaming(source, gptq(), ids, tmp_path / "out", progress=False)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="different settings.*config.*--restart"):
        quantize_gptq_streaming(source, gptq(bits=4), ids, tmp_path / "out", progress=False)
    quantize_gptq_streaming(source, gptq(bits=4), ids, tmp_path / "out", progress=False, resume=False)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]["bits"] == 4


def test_streaming_from_shards_and_a_missing_shard(tmp_path):
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "sharded"
    tiny_model().save_pretrained(folder, max_shard_size="100KB")
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) > 1
    ids = calib()
    out = quantize_gptq_streaming(folder, gptq(), ids, tmp_path / "out", progress=False, batch_size=4)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    quantize_gptq(model, gptq(), progress=False, calib_ids=ids, batch_size=4)
    assert_same_tensors(quant_tensors(load(out)), quant_tensors(model))

    shards[1].unlink()
    with pytest.raises(FileNotFoundError, match=f"missing: {shards[1].name}"):
        quantize_gptq_streaming(folder, gptq(), ids, tmp_path / "out2", progress=False)
    assert not (tmp_path / "out2.partial").exists()


def test_streaming_refuses_an_occupied_output_before_working(source, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite"):
        quantize_gptq_streaming(source, gptq(), calib(), out, progress=False)
    assert not (tmp_path / "taken.partial").exists() and (out / "keep.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="cannot hold the zero point 0"):
        quantize_gptq_streaming(source, gptq(), calib(), tmp_path / "v1", checkpoint_format="gptq")
    with pytest.raises(FileExistsError, match="holds keep.txt, which bitcliff did not write"):
        quantize_gptq_streaming(source, gptq(), calib(), out, progress=False, overwrite=True)
    assert (out / "keep.txt").read_text() == "mine"  # a user's file is never deleted

    ours = tmp_path / "ours"
    quantize_gptq_streaming(source, gptq(), calib(), ours, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        quantize_gptq_streaming(source, gptq(sym=True), calib(), ours, progress=False, overwrite=True)
    assert json.loads((ours / "config.json").read_text())["quantization_config"]["checkpoint_format"] == "gptq"
