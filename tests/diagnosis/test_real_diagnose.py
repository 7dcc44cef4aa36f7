"""Diagnosis of the embedded SmolLM2-135M: W2 collapses, W4 does not (lean: a few short windows;
the full runs are in docs/diagnosis.md)."""

from __future__ import annotations

import copy
import json

import pytest

import bitcliff
from bitcliff import QuantConfig, quantize
from bitcliff.cli import main as cli_main
from bitcliff.diagnosis.run import DiagnoseOptions

pytestmark = pytest.mark.slow

LEAN = DiagnoseOptions(trace_examples=1, patch_examples=0, capture_examples=1, lens_tokens=16, attention_rows=8)


@pytest.fixture(scope="module")
def fp_and_windows():
    from bitcliff.assets import load_text
    from bitcliff.data import evaluation_windows
    from bitcliff.models import load_fp_model

    model, tokenizer, _ = load_fp_model("default")
    return model, evaluation_windows(tokenizer, load_text("wiki"), n=3, seq_len=96)


@pytest.mark.parametrize("bits, expected", [(2, {"collapse"}), (4, {"degradation", "healthy"})])
def test_verdict_on_the_default_model(fp_and_windows, bits, expected):
    fp, windows = fp_and_windows
    q = quantize(copy.deepcopy(fp), QuantConfig(bits=bits, group_size=64), progress=False)
    report = bitcliff.diagnose(fp, q, windows, options=LEAN, progress=False)
    assert report.verdict.label in expected, report.summary()
    assert len(report.signal.rel_error) == 30


def test_cli_diagnose_on_the_fly(tmp_path, capsys):
    out = tmp_path / "diag"
    code = cli_main(["diagnose", "--model", "default", "--method", "rtn", "--bits", "2", "--group-size", "64",
                     "--examples", "3", "--seq-len", "64", "--trace-examples", "1", "--patch-examples", "0",
                     "--capture-examples", "1", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert printed.splitlines()[0].startswith("verdict: computation collapse")
    data = json.loads((out / "diagnosis.json").read_text())
    assert data["meta"]["name"] == "rtn-w2g64-asym" and data["verdict"]["label"] == "collapse"
    assert (out / "report.html").stat().st_size > 50_000


def test_cli_diagnose_a_saved_checkpoint(fp_and_windows, tmp_path, capsys):
    from bitcliff.models import load_fp_model

    fp, _ = fp_and_windows
    _, tokenizer, _ = load_fp_model("default")
    folder = tmp_path / "w4"
    bitcliff.save(quantize(copy.deepcopy(fp), QuantConfig(bits=4, group_size=64), progress=False), folder,
                  tokenizer=tokenizer)
    out = folder / "diagnosis"
    code = cli_main(["diagnose", "--model", "default", "--quantized", str(folder), "--examples", "3",
                     "--seq-len", "64", "--trace-examples", "1", "--patch-examples", "1", "--capture-examples", "1",
                     "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    data = json.loads((out / "diagnosis.json").read_text())
    assert data["meta"]["name"] == "w4" and data["verdict"]["label"] in ("degradation", "healthy")
    assert data["patching"]["recovery"]["residual"][-1] == pytest.approx(1.0, abs=1e-6)
    # the same output folder again is refused, and what is there stays
    before = (out / "diagnosis.json").read_bytes()
    assert cli_main(["diagnose", "--quantized", str(folder), "--fast", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (out / "diagnosis.json").read_bytes() == before
