"""The command line as a new user meets it: refusals before any work, one-line errors that name
the flag or the file, nothing of the user's lost, and messages instead of tracebacks."""

from __future__ import annotations

import errno
import json
import time

import pytest
from safetensors.torch import load_file, save_file

from bitcliff.cli import build_parser, main


def _text(folder):
    return str(folder.parent / "text.txt")


def _quantize(folder, out, *extra):
    return main(["quantize", "--model", str(folder), "--bits", "4", "--group-size", "32", "--out", str(out), *extra])


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    return err


def test_overwrite_never_deletes_a_users_files(tiny_folder, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("notes")
    (out / "data.csv").write_text("1,2")
    assert _quantize(tiny_folder, out, "--overwrite") == 2
    assert "holds data.csv (and 1 more), which bitcliff did not write" in _error(capsys)
    assert (out / "notes.txt").read_text() == "notes" and (out / "data.csv").read_text() == "1,2"
    ours = tmp_path / "ours"
    assert _quantize(tiny_folder, ours) == 0
    assert _quantize(tiny_folder, ours) == 2  # occupied, no --overwrite
    assert "pass overwrite=True (--overwrite)" in _error(capsys)
    assert _quantize(tiny_folder, ours, "--overwrite") == 0  # a checkpoint bitcliff wrote is replaced


def test_a_checkpoint_without_its_quantization_config_is_refused(tiny_folder, tmp_path, capsys):
    out = tmp_path / "q"
    assert _quantize(tiny_folder, out) == 0
    config = json.loads((out / "config.json").read_text())
    del config["quantization_config"]
    (out / "config.json").write_text(json.dumps(config))
    assert main(["eval", str(out), "--text-file", _text(tiny_folder), "--seq-len", "32", "--windows", "1"]) == 2
    err = _error(capsys)
    assert "holds GPTQ-packed tensors" in err and "qweight" in err and "restore quantization_config" in err


def test_missing_weights_are_named(tiny_folder, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_folder, broken)
    tensors = load_file(broken / "model.safetensors")
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    assert main(["eval", str(broken), "--text-file", _text(tiny_folder), "--seq-len", "32", "--windows", "1"]) == 2
    assert "missing keys: model.layers.1.mlp.down_proj.weight" in _error(capsys)


def test_an_edited_checkpoint_format_is_caught(tiny_folder, tmp_path, capsys):
    out = tmp_path / "q"
    assert _quantize(tiny_folder, out) == 0  # asymmetric: written as gptq_v2
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["checkpoint_format"] == "gptq_v2"
    config["quantization_config"]["checkpoint_format"] = "gptq"
    (out / "config.json").write_text(json.dumps(config))
    assert main(["eval", str(out), "--text-file", _text(tiny_folder), "--seq-len", "32", "--windows", "1"]) == 2
    assert "bitcliff wrote this checkpoint as 'gptq_v2'" in _error(capsys)


@pytest.mark.parametrize("argv,message", [
    (["quantize", "--bits", "3", "--group-size", "7", "--out", "x"], "--group-size: group_size must be -1"),
    (["quantize", "--bits", "5", "--out", "x"], "--bits: bits must be one of"),
    (["quantize", "--bits", "3", "--text-file", "no/such.txt", "--out", "x"], "--text-file no/such.txt: no such file"),
    (["quantize", "--bits", "3", "--model", "./no/such/folder", "--out", "x"], "the folder does not exist"),
    (["quantize", "--bits", "3", "--restart", "--out", "x"], "--restart discards a partial --streaming run"),
    (["sweep", "--group-sizes", "0"], "--group-sizes: group_size must be -1"),
    (["diagnose", "--bits", "2", "--compare", "rtn:5:64", "--out", "x"], "--compare rtn:5:64: bits must be one of"),
    (["diagnose", "--bits", "2", "--compare", "awq:4:64", "--out", "x"], "--compare 'awq:4:64': expected"),
    (["diagnose", "--bits", "2", "--patch-examples", "9", "--out", "x"], "patch_examples (9) cannot exceed"),
    (["cliff", "--budget", "inf", "--out", "x"], "--budget: budget must be a finite number"),
])
def test_bad_arguments_are_refused_before_any_work(argv, message, capsys, monkeypatch, tmp_path):
    import bitcliff.models

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(bitcliff.models, "load_fp_model", no_loading)
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert message in _error(capsys)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("argv", [["eval", "default", "--seq-len", "1"],
                                  ["diagnose", "--bits", "2", "--calib-seq-len", "1", "--out", "x"],
                                  ["repair", "--quantized", "x", "--seq-len", "1", "--out", "y"]])
def test_a_window_too_short_is_refused_naming_the_flag(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    flag = next(a for a in argv if a.endswith("seq-len"))
    assert f"argument {flag}: must be an integer >= 2" in _error(capsys)


def test_rtn_refuses_a_text_file_it_would_not_read(tiny_folder, tmp_path, capsys):
    assert _quantize(tiny_folder, tmp_path / "q", "--text-file", _text(tiny_folder)) == 2
    assert "--text-file is read only by GPTQ calibration" in _error(capsys)


def test_an_unreachable_hub_fails_fast_with_the_way_out(capsys):
    start = time.perf_counter()
    assert main(["eval", "no-such-owner/no-such-model"]) == 2
    assert time.perf_counter() - start < 15
    err = _error(capsys)
    assert "cannot load 'no-such-owner/no-such-model' from the Hugging Face hub" in err and "--model PATH" in err


def test_invalid_config_json_is_named(tiny_folder, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_folder, broken)
    (broken / "config.json").write_text("{ not json")
    assert main(["eval", str(broken)]) == 2
    assert "config.json is not valid JSON" in _error(capsys)


def test_a_full_disk_says_nothing_was_left_behind(tiny_folder, tmp_path, capsys, monkeypatch):
    import safetensors.torch

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    assert _quantize(tiny_folder, tmp_path / "q") == 1
    assert "no space left on device" in _error(capsys) and not any(tmp_path.iterdir())


@pytest.mark.parametrize("command, shown", [
    ("quantize", ["--method {rtn,gptq}  (default: rtn)", "(default: 64)"]),
    ("diagnose", ["(default: rtn)", "(default: 64)"]),
    ("sweep", ["(default: rtn)", "(default: 4 3 2)", "(default: 64)"]),
])
def test_help_shows_every_default_once(command, shown):
    import re

    text = build_parser()._subparsers._group_actions[0].choices[command].format_help()
    text = re.sub(r"\s+", " ", text)
    for piece in shown:
        assert re.sub(r"\s+", " ", piece) in text, piece
    assert "(default: asymmetric)" not in text and "(default: False)" not in text


def test_study_sweep_help_shows_its_lists():
    study = build_parser()._subparsers._group_actions[0].choices["study"]
    text = study._subparsers._group_actions[0].choices["sweep"].format_help()
    assert "(default: 32 64 128 -1)" in text and "(default: rtn gptq)" in text


def test_help_shows_the_defaults():
    text = build_parser()._subparsers._group_actions[0].choices["quantize"].format_help()
    assert "(default: 64)" in text and "--paper" in text and "(default: True)" in text


def test_quantize_avg_bits_mixes_widths_and_stores_them_as_dynamic(tiny_folder, tmp_path, capsys):
    out = tmp_path / "q"
    argv = ["quantize", "--model", str(tiny_folder), "--avg-bits", "3.5", "--text-file", _text(tiny_folder),
            "--seq-len", "32", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "mixed precision: " in printed and "bits per weight" in printed
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["dynamic"] and all(k.startswith("+:^") for k in qc["dynamic"])
    import bitcliff
    from bitcliff.quant.qlinear import QuantLinear

    layers = [m for m in bitcliff.load(out).modules() if isinstance(m, QuantLinear)]
    stored = sum(m.in_features * m.out_features * (m.bits + (16 + m.bits) / m.group_size) for m in layers)
    assert stored / sum(m.in_features * m.out_features for m in layers) <= 3.5 + 1e-9
    assert len({(m.bits, m.group_size) for m in layers}) > 1


@pytest.mark.parametrize("extra,message", [
    (["--avg-bits", "3", "--group-size", "64"], "--avg-bits chooses each module's group size"),
    (["--avg-bits", "3", "--group-size=128"], "--avg-bits chooses each module's group size"),
    (["--avg-bits", "3", "--method", "gptq", "--streaming"], "cannot run with --streaming"),
    (["--avg-bits", "1.5"], "--avg-bits: average bits 1.5 is below the cheapest choice"),
])
def test_quantize_avg_bits_refusals_name_the_problem(tiny_folder, tmp_path, extra, message, capsys):
    argv = ["quantize", "--model", str(tiny_folder), "--text-file", _text(tiny_folder), "--seq-len", "32",
            "--out", str(tmp_path / "q"), *extra]
    assert main(argv) == 2
    assert message in _error(capsys)
    assert not (tmp_path / "q").exists()


def test_quantize_takes_bits_or_avg_bits_not_both(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["quantize", "--bits", "3", "--avg-bits", "3.5", "--out", "o"])
    assert exit_.value.code == 2
    assert "not allowed with argument" in _error(capsys)


# ------------------------------------------------------------- what an output may replace


def _eval(folder, *extra, text_of=None):
    text = _text(text_of or folder)
    return main(["eval", str(folder), "--text-file", text, "--seq-len", "32", "--windows", "1", *extra])


def test_eval_json_replaces_only_a_result_bitcliff_wrote(tiny_folder, tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    assert _eval(tiny_folder, "--json", str(notes)) == 2
    assert "--json" in _error(capsys) and notes.read_text() == "my notes"
    assert _eval(tiny_folder, "--json", str(notes), "--overwrite") == 2
    assert "bitcliff did not write" in _error(capsys) and notes.read_text() == "my notes"

    ckpt = tmp_path / "q"
    assert _quantize(tiny_folder, ckpt) == 0
    config = (ckpt / "config.json").read_text()
    assert _eval(tiny_folder, "--json", str(ckpt / "config.json"), "--overwrite") == 2
    assert (ckpt / "config.json").read_text() == config

    result = tmp_path / "result.json"
    assert _eval(tiny_folder, "--json", str(result)) == 0
    assert _eval(tiny_folder, "--json", str(result)) == 2
    assert "--overwrite" in _error(capsys)
    assert _eval(tiny_folder, "--json", str(result), "--overwrite") == 0
    assert json.loads(result.read_text())["bitcliff_output"] == "eval"


def test_sweep_replaces_only_what_bitcliff_wrote_and_reads_group_size(tiny_folder, tmp_path, capsys):
    old = tmp_path / "oldsweep"
    old.mkdir()
    (old / "sweep.json").write_text('{"mine": 1}')
    argv = ["sweep", "--model", str(tiny_folder), "--bits", "4", "--group-size", "32", "--text-file",
            _text(tiny_folder), "--seq-len", "32", "--windows", "1", "--out-dir", str(old),
            "--reference-cache", str(tmp_path / "fp")]
    for extra in ([], ["--overwrite"]):
        assert main(argv + extra) == 2
        assert "sweep.json" in _error(capsys)
        assert (old / "sweep.json").read_text() == '{"mine": 1}'
    (old / "sweep.json").unlink()
    assert main(argv) == 0
    capsys.readouterr()
    rows = json.loads((old / "sweep.json").read_text())["rows"]
    assert rows[1]["setting"] == "rtn-w4g32-asym"  # --group-size is read, not ignored
    from bitcliff.eval import evaluate_text
    from bitcliff.models import load_fp_model
    from tests.conftest import word_tokenizer

    fp = evaluate_text(load_fp_model(str(tiny_folder))[0], word_tokenizer(), _text(tiny_folder), 1, 32)
    assert rows[0]["ppl"] == pytest.approx(fp["ppl"], rel=1e-6)  # the fp predictions are its evaluation
    assert rows[1]["kl_mean"] > 0 and 0 <= rows[1]["same_top_pct"] <= 100
    assert rows[1]["ppl_fp"] == pytest.approx(rows[0]["ppl"], rel=1e-9)
    assert main(argv) == 2  # its own outputs: replaced only with --overwrite
    assert "--overwrite" in _error(capsys)
    assert main(argv + ["--overwrite"]) == 0


def test_overwrite_keeps_other_outputs_kept_inside_a_checkpoint(tiny_folder, tmp_path, capsys):
    """One rule for a diagnosis saved into a checkpoint's folder and an eval --json file there:
    each is an output of its own, so --overwrite of the checkpoint refuses and names it."""
    from bitcliff.storage import replace_folder

    ckpt = tmp_path / "tq4c"
    assert _quantize(tiny_folder, ckpt) == 0
    replace_folder(ckpt / "diagnosis", lambda tmp: (tmp / "diagnosis.json").write_text("{}"), False, "diagnosis")
    assert _quantize(tiny_folder, ckpt, "--overwrite") == 2
    assert "holds diagnosis, a bitcliff output of its own (diagnosis)" in _error(capsys)
    assert (ckpt / "diagnosis" / "diagnosis.json").exists()
    import shutil

    shutil.rmtree(ckpt / "diagnosis")
    assert _eval(ckpt, "--json", str(ckpt / "eval.json"), text_of=tiny_folder) == 0
    capsys.readouterr()
    assert _quantize(tiny_folder, ckpt, "--overwrite") == 2
    assert "holds eval.json, a bitcliff output of its own (eval)" in _error(capsys)
    (ckpt / "eval.json").unlink()
    assert _quantize(tiny_folder, ckpt, "--overwrite") == 0


def test_an_output_given_as_a_symbolic_link_is_written_where_it_points(tiny_folder, tmp_path, capsys):
    target = tmp_path / "real"
    target.mkdir()
    link = tmp_path / "link"
    link.symlink_to(target)
    assert _quantize(tiny_folder, link) == 0
    assert _quantize(tiny_folder, link, "--overwrite") == 0
    assert link.is_symlink() and (target / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]  # nothing hidden left behind
