"""The embedded SmolLM2-135M end to end: quantize, save, reload, evaluate.

Lean by design (a few windows): the full protocol numbers live in docs/results.md.
"""

from __future__ import annotations

import json

import pytest
import torch

import bitcliff
from bitcliff import QuantConfig
from bitcliff.cli import main as cli_main
from bitcliff.data import evaluation_windows
from bitcliff.eval import evaluate_ppl
from bitcliff.quant.qlinear import QuantLinear

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fp_model():
    from bitcliff.models import load_fp_model

    model, tokenizer, _ = load_fp_model("default")
    return model, tokenizer


@pytest.fixture(scope="module")
def eval_ids(fp_model):
    from bitcliff.assets import load_text

    return evaluation_windows(fp_model[1], load_text("wiki"), n=2)


@pytest.fixture(scope="module")
def fp_ppl(fp_model, eval_ids):
    return evaluate_ppl(fp_model[0], eval_ids, progress=False)["ppl"]


def _quantized_copy(fp_model, config):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(fp_model.config, dtype=torch.float32)
    model.load_state_dict(fp_model.state_dict())
    return bitcliff.quantize(model.eval(), config, progress=False)


def test_fp_perplexity_is_sane(fp_ppl):
    assert 5 < fp_ppl < 60


def test_w4_round_trip_exact_and_size_on_disk(fp_model, eval_ids, fp_ppl, tmp_path):
    model, tokenizer = fp_model
    config = QuantConfig(bits=4, group_size=64)
    q = _quantized_copy(model, config)
    layers = [m for m in q.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 30 * 7
    path = bitcliff.save(q, tmp_path / "w4", tokenizer=tokenizer)
    assert bitcliff.save(q, tmp_path / "w4-fp16", dtype=torch.float16).exists()  # the compact option
    loaded = bitcliff.load(path)
    ids = eval_ids[:1, :64]
    assert torch.equal(q(ids).logits, loaded(ids).logits)

    n_quantized = sum(m.in_features * m.out_features for m in layers)
    g_idx_bytes = sum(4 * m.in_features for m in layers)
    # embeddings (the head is tied to them and stored once) and norms keep the model's fp32
    rest = sum(p.numel() for n, p in model.named_parameters() if "embed" in n or "norm" in n)
    expected = n_quantized * config.effective_bits(576) / 8 + 4 * rest + g_idx_bytes
    on_disk = (path / "model.safetensors").stat().st_size
    assert abs(on_disk - expected) / expected < 0.01, (on_disk, expected)

    ppl = evaluate_ppl(loaded, eval_ids, progress=False)["ppl"]
    assert fp_ppl < ppl < 1.6 * fp_ppl


def test_w2_falls_off_the_cliff(fp_model, eval_ids, fp_ppl):
    q = _quantized_copy(fp_model[0], QuantConfig(bits=2, group_size=64))
    assert evaluate_ppl(q, eval_ids, progress=False)["ppl"] > 100 * fp_ppl


def test_the_compiled_cpu_kernel_and_the_plain_torch_path_give_the_same_perplexity(fp_model, eval_ids, monkeypatch):
    from bitcliff.kernels import cpu, cpu_packed

    q = _quantized_copy(fp_model[0], QuantConfig(bits=3, group_size=64))
    layers = [m for m in q.modules() if isinstance(m, QuantLinear)]
    compiled = evaluate_ppl(q, eval_ids, progress=False)["ppl"]
    assert all(isinstance(m.kernel_layout(), cpu_packed.PackedLayout) for m in layers)
    monkeypatch.setattr(cpu, "native_ops", lambda: None)  # as on a machine without a compiler
    for m in layers:
        m._layout = None
    plain = evaluate_ppl(q, eval_ids, progress=False)["ppl"]
    assert all(isinstance(m.kernel_layout(), cpu.ByteLayout) for m in layers)
    assert f"{compiled:.4g}" == f"{plain:.4g}", (compiled, plain)


def test_cli_quantize_then_eval(tmp_path, capsys):
    out = tmp_path / "w3g64"
    assert cli_main(["quantize", "--model", "default", "--bits", "3", "--group-size", "64", "--out", str(out)]) == 0
    assert cli_main(["quantize", "--model", "default", "--bits", "3", "--group-size", "64", "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    report = tmp_path / "eval.json"
    assert cli_main(["eval", str(out), "--windows", "1", "--json", str(report)]) == 0
    result = json.loads(report.read_text())
    assert result["quantized"] and result["config"]["bits"] == 3 and result["config"]["group_size"] == 64
    assert len(result["nll_per_window"]) == 1 and result["tokens"] == 511 and result["ppl"] > 1


def test_cli_unknown_model_is_a_clear_error(capsys):
    assert cli_main(["eval", "no-such-model!"]) == 2
    assert "no-such-model!" in capsys.readouterr().err


def test_cli_streaming_gptq_writes_a_loadable_checkpoint(tmp_path, capsys):
    out = tmp_path / "w4-stream"
    code = cli_main(["quantize", "--model", "default", "--method", "gptq", "--bits", "4", "--group-size", "64",
                     "--calib-samples", "2", "--seq-len", "64", "--streaming", "--true-sequential",
                     "--static-groups", "--refit-rounds", "1", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    assert "(streaming)" in capsys.readouterr().out
    log = json.loads((out / "gptq_log.json").read_text())
    assert len(log) == 30 * 7 and not (tmp_path / "w4-stream.partial").exists()
    assert all(0 < e["refit_rows"] <= 1 for e in log)
    model = bitcliff.load(out)
    assert model.bitcliff_config.refit_rounds == 1 and model.bitcliff_config.true_sequential
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 30 * 7
    code = cli_main(["quantize", "--model", "default", "--method", "rtn", "--bits", "4", "--streaming",
                     "--out", str(tmp_path / "rtn-stream")])
    assert code == 2 and "--streaming is a GPTQ mode" in capsys.readouterr().err
