"""Whole-model GPTQ: layer-wise orchestration, streaming from disk, interruption and resume."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

import bitcliff
from bitcliff.quant import gptq_stream
from bitcliff.quant.checkpoint import load, save
from bitcliff.quant.config import QuantConfig
from bitcliff.quant.gptq_model import (
    capture_calibration_inputs,
    find_decoder_layers,
    quantize_gptq,
    write_gptq_log,
)
from bitcliff.quant.gptq_stream import quantize_gptq_streaming
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
    return QuantConfig(method="gptq", **kw)


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


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("src") / "tiny"
    tiny_model().save_pretrained(folder)
    return folder


# ----------------------------------------------------------------------------- in memory


@pytest.mark.parametrize("true_sequential", [False, True])
def test_quantize_gptq_converts_every_decoder_linear(true_sequential):
    model = tiny_model()
    ids = calib()
    with torch.no_grad():
        fp_logits = model(ids).logits
    out = quantize_gptq(model, gptq(true_sequential=true_sequential), progress=False, calib_ids=ids, batch_size=4)
    assert out is model and model.bitcliff_config.method == "gptq"
    names = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    assert len(names) == 14 and all(n.startswith("model.layers.") for n in names)
    assert type(model.lm_head) is nn.Linear  # skipped by default
    log = model.bitcliff_log
    assert [e["module"] for e in log] == names
    first = log[0]
    assert first["group"] == [f"model.layers.0.self_attn.{p}_proj" for p in "qkv"]
    assert first["damp_percent"] == 0.01 and first["fallback"] is None and first["tokens"] == N_WINDOWS * SEQ
    assert all(e["loss"] > 0 and e["seconds"] >= 0 for e in log)
    with torch.no_grad():
        q_logits = model(ids).logits
    assert torch.isfinite(q_logits).all()
    assert (q_logits - fp_logits).abs().mean() < 0.5 * fp_logits.abs().mean()


def test_gptq_output_error_is_below_rtn():
    ids = calib(8)
    fp = tiny_model(initializer_range=0.1)
    with torch.no_grad():
        ref = fp(ids).logits
    errors = {}
    for method in ("rtn", "gptq"):
        model = tiny_model(initializer_range=0.1)
        config = QuantConfig(bits=3, group_size=32, method=method, calib_samples=8)
        bitcliff.quantize(model, config, progress=False, calib_ids=ids)
        with torch.no_grad():
            errors[method] = float(((model(ids).logits - ref) ** 2).mean())
    assert errors["gptq"] < 0.8 * errors["rtn"]


def test_refit_rounds_lower_the_model_output_error_and_are_logged():
    ids = calib(8)
    fp = tiny_model(initializer_range=0.1)
    with torch.no_grad():
        ref = fp(ids).logits
    errors, logs = {}, {}
    for rounds in (0, 2):
        model = tiny_model(initializer_range=0.1)
        config = gptq(bits=2, calib_samples=8, true_sequential=True, refit_rounds=rounds)
        quantize_gptq(model, config, progress=False, calib_ids=ids)
        with torch.no_grad():
            errors[rounds] = float(((model(ids).logits - ref) ** 2).mean())
        logs[rounds] = model.bitcliff_log
    assert errors[2] < errors[0]
    assert all(e["refit_rows"] is None for e in logs[0])
    assert all(0 < e["refit_rows"] <= 1 for e in logs[2])


def test_true_sequential_solves_each_group_on_inputs_from_the_quantized_groups_before_it(monkeypatch):
    """The suspended single forward must give what restarting the layer for every group gives."""
    from bitcliff.quant import gptq_layer

    ids = calib()
    config = gptq(true_sequential=True, act_order=True)
    fast = quantize_gptq(tiny_model(), config, progress=False, calib_ids=ids, batch_size=4)

    def restart_per_group(layer, targets, inputs, calls, config, names, index, groups=None):
        groups = groups or gptq_layer.discover_groups(layer, targets, inputs[0], calls[0])
        accs = {g[0]: gptq_layer.HessianAccumulator(targets[g[0]].in_features) for g in groups}
        passes, results = gptq_layer._Passes(targets, accs), {}
        for group in groups:
            with passes.capturing([group], stop_at=group[0]):
                gptq_layer._forward_all(layer, inputs, calls)
            results.update(gptq_layer._solve_group(group, accs[group[0]], targets, names, config)[0])
        return gptq_layer.LayerResult(gptq_layer._forward_all(layer, inputs, calls), results, [], groups)

    from bitcliff.quant import gptq_model

    monkeypatch.setattr(gptq_model, "quantize_layer", restart_per_group)
    slow = quantize_gptq(tiny_model(), config, progress=False, calib_ids=ids, batch_size=4)
    assert_same_tensors(quant_tensors(fast), quant_tensors(slow))


def test_an_error_inside_a_suspended_forward_surfaces_and_frees_the_threads(monkeypatch):
    import threading

    model = tiny_model()
    calls = []

    def boom(module, args):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("broken o_proj")

    model.model.layers[0].self_attn.o_proj.register_forward_pre_hook(boom)
    before = threading.active_count()
    with pytest.raises(RuntimeError, match="broken o_proj"):
        quantize_gptq(model, gptq(true_sequential=True), progress=False, calib_ids=calib(), batch_size=1)
    assert threading.active_count() == before


def test_calibration_input_errors():
    model = tiny_model()
    for bad, match in [
        (None, "needs calibration data"),
        (torch.empty(0, SEQ, dtype=torch.long), "non-empty"),
        (torch.zeros(SEQ, dtype=torch.long), "non-empty"),
        (torch.zeros(3, SEQ), "integer tensor"),
        (calib(2), "holds 2 windows but config.calib_samples=6"),
    ]:
        with pytest.raises(ValueError, match=match):
            quantize_gptq(model, gptq(), progress=False, calib_ids=bad)
    with pytest.raises(ValueError, match="method='gptq'"):
        quantize_gptq(model, QuantConfig(method="rtn"), calib_ids=calib())
    assert not any(isinstance(m, QuantLinear) for m in model.modules())  # nothing half-done


def test_calibration_text_too_short_or_empty():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    from bitcliff.data import calibration_windows

    words = Tokenizer(WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    words.pre_tokenizer = Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words)
    with pytest.raises(ValueError, match="gives only 0 windows of 512 tokens, 1 requested"):
        calibration_windows(tokenizer, "a b a b", n=1, seq_len=512)
    with pytest.raises(ValueError, match="gives only 2 windows"):
        calibration_windows(tokenizer, "a b " * 600, n=64, seq_len=512)
    with pytest.raises(ValueError, match="empty"):
        calibration_windows(tokenizer, "   ", n=1)


def test_unsupported_model_structure_is_named():
    with pytest.raises(ValueError, match="cannot find the decoder layers of Sequential"):
        find_decoder_layers(nn.Sequential(nn.Linear(4, 4)))


def test_head_outside_the_layers_gets_rtn_with_a_warning():
    model = tiny_model(tie_word_embeddings=False)
    with pytest.warns(RuntimeWarning, match="lm_head lies outside the decoder layers"):
        quantize_gptq(model, gptq(skip_modules=()), progress=False, calib_ids=calib())
    assert isinstance(model.lm_head, QuantLinear)
    assert model.bitcliff_log[-1]["module"] == "lm_head" and model.bitcliff_log[-1]["fallback"]


def test_gemma3_layers_get_their_own_masks_and_rotary_embeddings():
    """Gemma 3 alternates sliding and global layers with different masks and RoPE bases: the
    captured per-layer inputs must reproduce the model's own forward exactly."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, vocab_size=128, sliding_window=8,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
    )
    model = Gemma3ForCausalLM(config).eval()
    ids = calib()
    _, layers = find_decoder_layers(model)
    inputs = capture_calibration_inputs(model, layers, ids, batch_size=4)
    assert inputs.calls[0][0][1]["position_embeddings"][0] is not inputs.calls[1][0][1]["position_embeddings"][0]
    with torch.no_grad():
        expected = model(ids, output_hidden_states=True).hidden_states
        for b, hidden in enumerate(inputs.hidden):
            rows = slice(4 * b, 4 * b + hidden.shape[0])
            for i, layer in enumerate(layers):
                assert torch.equal(hidden, expected[i][rows])
                args, kwargs = inputs.calls[i][b]
                hidden = layer(hidden, *args, **kwargs)
    quantize_gptq(model, gptq(true_sequential=True), progress=False, calib_ids=ids)
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 21


def test_write_gptq_log(tmp_path):
    path = write_gptq_log([{"layer": 0, "module": "x", "loss": None}], tmp_path)
    assert path.name == "gptq_log.json" and json.loads(path.read_text())[0]["module"] == "x"


# ----------------------------------------------------------------------------- streaming


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
    assert [e["module"] for e in log] == [e["module"] for e in model.bitcliff_log]
    loaded = load(out)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=0.05, rtol=0.05)


def test_interrupted_run_resumes_to_the_same_result(source, tmp_path, monkeypatch):
    config, ids = gptq(true_sequential=True), calib()
    whole = quantize_gptq_streaming(source, config, ids, tmp_path / "whole", progress=False, batch_size=4)

    real = gptq_stream.quantize_layer

    def crash_at_layer_1(layer, targets, inputs, calls, config, names, index, *rest):
        if index == 1:
            raise KeyboardInterrupt
        return real(layer, targets, inputs, calls, config, names, index, *rest)

    monkeypatch.setattr(gptq_stream, "quantize_layer", crash_at_layer_1)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        quantize_gptq_streaming(source, config, ids, out, progress=False, batch_size=4)
    work = tmp_path / "resumed.partial"
    assert not out.exists()
    assert json.loads((work / "progress.json").read_text())["layers_done"] == 1
    finished = os.stat(work / "layer-00000.safetensors")

    monkeypatch.setattr(gptq_stream, "quantize_layer", real)
    calls = []
    monkeypatch.setattr(gptq_stream, "quantize_layer", lambda *a, **k: calls.append(a[6]) or real(*a, **k))
    quantize_gptq_streaming(source, config, ids, out, progress=False, batch_size=4)
    assert calls == [1]  # layer 0 was not redone
    again = os.stat(out / "layer-00000.safetensors")
    assert (again.st_ino, again.st_mtime_ns) == (finished.st_ino, finished.st_mtime_ns)  # never rewritten
    assert_same_tensors(folder_tensors(whole), folder_tensors(out))
    def without_times(path):
        return [{k: v for k, v in e.items() if k != "seconds"} for e in json.loads(path.read_text())]

    assert without_times(out / "gptq_log.json") == without_times(whole / "gptq_log.json")


def test_resume_refuses_other_settings(source, tmp_path, monkeypatch):
    ids = calib()
    monkeypatch.setattr(gptq_stream, "quantize_layer", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        quantize_gptq_streaming(source, gptq(), ids, tmp_path / "out", progress=False)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="different settings.*config"):
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
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        quantize_gptq_streaming(source, gptq(sym=True), calib(), out, progress=False, overwrite=True)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["checkpoint_format"] == "gptq"
    assert not (out / "keep.txt").exists()
