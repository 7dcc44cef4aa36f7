"""``bitcliff.diagnose`` end to end on a tiny model: report, files, errors, CLI refusals."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import bitcliff
from bitcliff import QuantConfig, quantize
from bitcliff.cli import main as cli_main
from bitcliff.diagnosis.run import DiagnoseOptions, prepare_examples
from bitcliff.diagnosis.verdict import verdict_from_dict


@pytest.fixture
def pair(tiny_llama):
    return tiny_llama, quantize(copy.deepcopy(tiny_llama), QuantConfig(bits=2, group_size=32), progress=False)


@pytest.fixture
def windows():
    return torch.randint(0, 128, (5, 20), generator=torch.Generator().manual_seed(3))


def test_diagnose_report_and_files(pair, windows, tmp_path):
    fp, q = pair
    w4 = quantize(copy.deepcopy(fp), QuantConfig(bits=4, group_size=32), progress=False)
    report = bitcliff.diagnose(fp, q, windows, compare={"w4": w4}, options=DiagnoseOptions.fast(),
                               name="w2", progress=False)
    # A random tiny model at W2: its components lose their function (local F ~ 0.1) but the
    # residual stream stays aligned and the output agrees: one collapse vote, so degradation.
    fired = [i.name for i in report.verdict.indicators if i.fires]
    assert fired == ["early_function"] and report.verdict.label == "degradation"
    assert verdict_from_dict(report.to_dict()).label == report.verdict.label
    first = report.summary().splitlines()[0]
    assert first.startswith("verdict: signal degradation (3 of 4 indicators agree)")
    assert report.ppl_q > report.ppl_fp > 1
    assert set(report.inputs.delta_nll) == {"w2", "w4"}
    paths = report.save(tmp_path / "diag")
    data = json.loads(paths["json"].read_text())
    assert data["verdict"]["label"] == report.verdict.label
    page = paths["html"].read_text()
    assert report.verdict.headline() in page
    assert page.count("<img ") >= 7 and "data:image/png;base64," in page
    assert "http://" not in page and "https://" not in page  # self-contained
    # an existing report is kept unless overwrite is asked for
    before = paths["json"].read_bytes()
    with pytest.raises(FileExistsError):
        report.save(tmp_path / "diag")
    assert paths["json"].read_bytes() == before
    report.save(tmp_path / "diag", overwrite=True)


def test_bad_inputs_are_clear_errors(pair, windows):
    fp, q = pair
    fast = DiagnoseOptions.fast()
    with pytest.raises(ValueError, match="empty"):
        bitcliff.diagnose(fp, q, [], options=fast, progress=False)
    with pytest.raises(ValueError, match="example 1 is empty text"):
        prepare_examples(["some text", "   "], tokenizer=object())
    with pytest.raises(ValueError, match="need a tokenizer"):
        prepare_examples(["some text"])
    with pytest.raises(ValueError, match="context length 64"):
        bitcliff.diagnose(fp, q, torch.zeros(3, 65, dtype=torch.long), options=fast, progress=False)
    with pytest.raises(ValueError, match="at least 3 examples"):
        bitcliff.diagnose(fp, q, windows[:2], options=fast, progress=False)
    with pytest.raises(ValueError, match="int64"):
        bitcliff.diagnose(fp, q, windows.float(), options=fast, progress=False)
    with pytest.raises(ValueError, match="no QuantLinear"):
        bitcliff.diagnose(fp, fp, windows, options=fast, progress=False)


def test_out_of_vocabulary_ids_are_refused_naming_the_id_and_the_vocabulary(pair, windows):
    fp, q = pair
    bad = windows.clone()
    bad[1, 3] = 500
    with pytest.raises(ValueError, match=r"token id 500 \(at \(1, 3\)\), outside the model's vocabulary of 128 ids"):
        bitcliff.diagnose(fp, q, bad, options=DiagnoseOptions.fast(), progress=False)
    with pytest.raises(ValueError, match=r"calibration windows hold token id 500 .* vocabulary of 128 ids"):
        quantize(copy.deepcopy(fp), QuantConfig(bits=4, group_size=32, method="gptq", calib_samples=5),
                 calib_ids=bad, progress=False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_model_is_diagnosed_like_fp32(tiny_llama, windows, dtype):
    """The diagnosis keeps residual streams in fp32 and reads them back in the model's dtype."""
    fp = tiny_llama.to(dtype)
    q = quantize(copy.deepcopy(fp), QuantConfig(bits=2, group_size=32), progress=False)
    report = bitcliff.diagnose(fp, q, windows, options=DiagnoseOptions.fast(), progress=False)
    reference = bitcliff.diagnose(fp.float(), quantize(copy.deepcopy(fp.float()), QuantConfig(bits=2, group_size=32),
                                                       progress=False),
                                  windows, options=DiagnoseOptions.fast(), progress=False)
    assert report.verdict.label == reference.verdict.label
    assert report.ppl_q == pytest.approx(reference.ppl_q, rel=0.05)


def test_a_quantized_model_of_other_weights_is_refused(pair, windows):
    fp, q = pair
    permuted = copy.deepcopy(q)
    layers = permuted.model.layers
    layers[0], layers[1] = layers[1], layers[0]  # same architecture, layers swapped
    with pytest.raises(ValueError, match=r"these models do not match \(model.layers.0.self_attn.q_proj: "
                                         r"relative weight error [0-9.]+"):
        bitcliff.diagnose(fp, permuted, windows, options=DiagnoseOptions.fast(), progress=False)


def test_cli_refuses_a_folder_that_is_not_a_checkpoint(tmp_path, capsys):
    folder = tmp_path / "not-a-checkpoint"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    code = cli_main(["diagnose", "--quantized", str(folder), "--out", str(tmp_path / "out")])
    assert code == 2
    assert "not a bitcliff/GPTQ checkpoint folder" in capsys.readouterr().err
    code = cli_main(["diagnose", "--quantized", str(folder), "--bits", "2", "--out", str(tmp_path / "out")])
    assert code == 2
    assert "either --quantized" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
