"""Round two of a new user's bad inputs and faults: nothing silently wrong (a NaN is not a
perplexity), a message instead of a traceback, and every refusal before the expensive part,
naming the flag as the command line spells it (docs/bad-inputs.md lists the whole pass)."""

from __future__ import annotations

import errno
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from bitcliff.cli import main


def _text(folder) -> str:
    return str(folder.parent / "text.txt")


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    return err


@pytest.fixture(scope="module")
def checkpoint(tiny_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("bad") / "q"
    assert main(["quantize", "--model", str(tiny_folder), "--bits", "4", "--group-size", "32", "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_checkpoint_with_non_finite_scales_is_refused_naming_the_tensor(checkpoint, tmp_path, tiny_folder,
                                                                          capsys, value):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
    tensors = load_file(broken / "model.safetensors")
    key = next(k for k in sorted(tensors) if k.endswith(".scales"))
    tensors[key][0, 0] = value
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    assert main(["eval", str(broken), "--text-file", _text(tiny_folder), "--seq-len", "32", "--windows", "1",
                 "--json", str(tmp_path / "r.json")]) == 2
    assert f"tensor {key} holds 1 NaN or Inf value(s)" in _error(capsys)
    assert not (tmp_path / "r.json").exists()


def test_windows_longer_than_the_models_context_are_refused(tiny_folder, capsys):
    # the tiny model's context is 512 tokens
    assert main(["eval", str(tiny_folder), "--text-file", _text(tiny_folder), "--seq-len", "600",
                 "--windows", "1"]) == 2
    assert ("evaluation windows of 600 tokens are longer than the model's context of 512 tokens "
            "(max_position_embeddings): use --seq-len 512 or less") in _error(capsys)


def test_a_full_disk_while_saving_is_one_line_and_leaves_nothing(tiny_folder, tmp_path, monkeypatch, capsys):
    import safetensors.torch
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        raise SafetensorError('Error while serializing: I/O error: No space left on device (os error 28) at path "x"')

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    out = tmp_path / "q"
    assert main(["quantize", "--model", str(tiny_folder), "--bits", "4", "--group-size", "32", "--out", str(out)]) == 1
    err = _error(capsys).splitlines()[-1]  # after the progress bars
    assert err.startswith("bitcliff quantize: error: no space left on device") and "nothing was left behind" in err
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("argv,flag", [
    (["quantize", "--bits", "4", "--out", "{file}/q"], "--out"),
    (["sweep", "--bits", "4", "--out-dir", "{file}"], "--out-dir"),
    (["cliff", "--bits", "4", "--out", "{file}"], "--out"),
    (["eval", "default", "--json", "{folder}"], "--json"),
    (["eval", "default", "--against", "default", "--reference-cache", "{file}"], "--reference-cache"),
    (["sweep", "--bits", "4", "--reference-cache", "{file}"], "--reference-cache"),
])
def test_an_output_that_can_never_be_written_is_refused_before_any_work(tiny_folder, tmp_path, monkeypatch, capsys,
                                                                         argv, flag):
    import bitcliff.models

    def no_work(*args, **kwargs):
        raise AssertionError("a model was loaded before the output was checked")

    monkeypatch.setattr(bitcliff.models, "load_fp_model", no_work)
    monkeypatch.setattr(bitcliff.models, "load_any", no_work)
    (tmp_path / "a-file").write_text("mine")
    argv = [a.format(file=tmp_path / "a-file", folder=tmp_path) for a in argv]
    if argv[0] != "eval":
        argv += ["--model", str(tiny_folder)]
    assert main(argv) == 2
    err = _error(capsys)
    assert f"{flag} " in err and ("is a file, not a folder" in err or "is not a folder" in err
                                   or "is a folder; give the path of a file" in err)
    assert (tmp_path / "a-file").read_text() == "mine"


def test_a_read_only_place_and_a_mount_point_are_refused_with_the_reason(tiny_folder, tmp_path, monkeypatch, capsys):
    import tempfile

    import bitcliff.storage

    quantize = ["quantize", "--model", str(tiny_folder), "--bits", "4", "--group-size", "32", "--out"]
    mount = tmp_path / "mnt"
    mount.mkdir()
    monkeypatch.setattr(bitcliff.storage.os.path, "ismount", lambda p: os.fspath(p) == os.fspath(mount))
    assert main([*quantize, str(mount)]) == 2
    err = _error(capsys)
    assert f"{mount} is a mount point" in err and f"give a folder inside it, e.g. {mount / 'out'}" in err

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    assert main([*quantize, str(tmp_path / "q")]) == 2
    assert f"does not accept files ({os.strerror(errno.EROFS)})" in _error(capsys)


def test_reference_cache_flags_without_against_or_together_are_refused(capsys):
    assert main(["eval", "default", "--reference-cache", "somewhere"]) == 2
    assert "--reference-cache and --no-reference-cache apply to eval --against MODEL only" in _error(capsys)
    with pytest.raises(SystemExit):
        main(["eval", "default", "--against", "default", "--reference-cache", "x", "--no-reference-cache"])
    assert "not allowed with argument" in _error(capsys)


@pytest.mark.parametrize("argv,message", [
    (["sweep", "--group-sizes", "0"], "--group-sizes: group_size"),
    (["cliff", "--bits", "3", "--group-size", "7"], "group_size"),
])
def test_refused_values_name_the_flag_as_the_command_spells_it(tiny_folder, tmp_path, argv, message, capsys):
    assert main([*argv, "--model", str(tiny_folder)]) == 2
    assert message in _error(capsys)


@pytest.mark.parametrize("argv,flag", [
    (["repair", "--quantized", "q", "--out", "o", "--calib-samples", "0"], "--calib-samples"),
    (["diagnose", "--bits", "3", "--out", "o", "--examples", "0"], "--examples"),
    (["eval", "default", "--windows", "-1"], "--windows"),
    (["cliff", "--workers", "0"], "--workers"),
    (["quantize", "--bits", "3", "--out", "o", "--rank-timeout", "nan"], "--rank-timeout"),
    (["repair", "--quantized", "q", "--out", "o", "--seq-len", "x"], "--seq-len"),
])
def test_counts_are_checked_when_the_command_line_is_read(argv, flag, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = _error(capsys)
    assert f"argument {flag}: must be" in err


def test_an_unknown_allocator_is_refused_when_the_command_line_is_read(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["repair", "--quantized", "q", "--out", "o", "--allocator", "greedy"])
    assert exit_.value.code == 2
    assert "argument --allocator: invalid choice: 'greedy' (choose from 'measured', 'diagnosis')" in _error(capsys)


def test_an_early_interrupt_of_a_streaming_run_says_nothing_was_kept(tiny_folder, tmp_path, monkeypatch, capsys):
    import bitcliff.quant.gptq_stream as stream

    out = tmp_path / "q"
    argv = ["quantize", "--model", str(tiny_folder), "--method", "gptq", "--bits", "4", "--group-size", "32",
            "--streaming", "--calib-samples", "4", "--seq-len", "32", "--text-file", _text(tiny_folder),
            "--out", str(out)]

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(stream, "quantize_gptq_streaming", interrupted)
    assert main(argv) == 130
    err = _error(capsys)
    assert "no layer had finished, so there was nothing to keep" in err and ".partial" not in err
    work = tmp_path / "q.partial"
    work.mkdir()
    (work / stream.PROGRESS_FILE).write_text(json.dumps({"layers_done": 1, "settings": {}, "log": []}))
    assert main(argv) == 130
    assert f"the 1 finished layers are kept in {work}" in _error(capsys)


def test_a_study_row_edited_by_hand_is_named_by_file_and_line(tmp_path, capsys):
    row = {"model": "m", "method": "rtn", "bits": 3, "group_size": 64, "calib": None, "effective_bits": "3.3",
           "nll": {"overall": 4.0}}
    (tmp_path / "rows.jsonl").write_text(json.dumps({"model": "m", "method": "fp", "parameters": 10, "hidden_size": 4,
                                                     "fingerprint": "f", "nll": {"overall": 3.0}}) + "\n"
                                         + json.dumps(row) + "\n")
    assert main(["study", "fit", str(tmp_path)]) == 2
    assert (f"{tmp_path / 'rows.jsonl'}, line 2: 'effective_bits' must be a finite number, got '3.3'; "
            "remove or repair that line") in _error(capsys)
    (tmp_path / "law.json").write_text('{"models": {"m": ')
    assert main(["study", "predict", str(tmp_path / "law.json"), "--model", "m", "--method", "rtn", "--bits", "3"]) == 2
    assert f"{tmp_path / 'law.json'} is not JSON" in _error(capsys)


def test_rows_of_a_real_sweep_pass_the_row_check():
    from pathlib import Path

    from bitcliff.study.sweep import read_rows

    rows = read_rows(Path(__file__).parents[1] / "bench" / "results" / "study-rows.jsonl")
    assert len(rows) > 20 and {r["method"] for r in rows} == {"fp", "rtn", "gptq"}


def test_finite_weights_cost_little_to_check():
    from bitcliff.quant.tensor_files import CheckpointError, check_finite_tensor

    check_finite_tensor(torch.zeros(4, dtype=torch.int32), "ints are not checked")
    check_finite_tensor(torch.ones(4, dtype=torch.float16), "finite")
    with pytest.raises(CheckpointError, match="x holds 2 NaN or Inf value"):
        check_finite_tensor(torch.tensor([1.0, float("-inf"), float("nan")]), "x")


@pytest.mark.parametrize("field,value,expected", [
    ("dynamic", {"+:model.layers.(": {"bits": 4}}, "quantization_config.dynamic['+:model.layers.(']: the key is not a valid regular expression"),
    ("dynamic", ["+:.*"], "quantization_config.dynamic must be a mapping of module-name regex to override, got list"),
    ("dynamic", {"+:.*": 3}, "quantization_config.dynamic['+:.*'] must be a mapping"),
    ("dynamic", {"+:.*": {"bits": "4"}}, "quantization_config.dynamic['+:.*'].bits must be an integer, got '4'"),
    ("sym", "false", "quantization_config.sym must be true or false, got 'false'"),
    ("meta", [], "quantization_config.meta must be a mapping, got list"),
])
def test_a_hand_edited_quantization_config_is_refused_on_load_naming_the_field(checkpoint, tmp_path, tiny_folder,
                                                                               capsys, field, value, expected):
    import shutil

    edited = tmp_path / "edited"
    shutil.copytree(checkpoint, edited)
    config = json.loads((edited / "config.json").read_text())
    config["quantization_config"][field] = value
    (edited / "config.json").write_text(json.dumps(config))
    assert main(["eval", str(edited), "--text-file", _text(tiny_folder), "--seq-len", "32", "--windows", "1"]) == 2
    err = _error(capsys)
    assert expected in err and len(err.splitlines()) == 1


def test_a_hand_edited_manifest_is_refused_on_load_naming_the_field(checkpoint, tmp_path, tiny_folder, capsys):
    import shutil

    from bitcliff.storage import MANIFEST

    edited = tmp_path / "edited"
    shutil.copytree(checkpoint, edited)
    manifest = json.loads((edited / MANIFEST).read_text())
    manifest["digests"] = ["0" * 64]
    (edited / MANIFEST).write_text(json.dumps(manifest))
    assert main(["eval", str(edited), "--text-file", _text(tiny_folder), "--seq-len", "32", "--windows", "1"]) == 2
    assert "'digests' must map file names to sha256 digests" in _error(capsys)


def test_the_bad_input_pass_lists_every_case_with_its_class():
    """``bench.bad_inputs`` (too long for the suite) is checked here for what can go wrong before
    it runs: every case has a class, names only places its fixtures make, and is listed once."""
    import string

    from bench.bad_inputs import CLASSES, PLACES, _cases

    cases = _cases()
    assert len({case.what for case in cases}) == len(cases)
    assert {case.kind for case in cases} <= set(CLASSES)
    named = {field for case in cases for arg in case.argv for _, field, _, _ in string.Formatter().parse(arg) if field}
    assert named <= PLACES
    issue_37 = {case.what: case.kind for case in cases if case.kind != "refusal"}
    assert {"data loss", "silently wrong", "traceback", "late or unclear"} == set(issue_37.values())
    assert issue_37["eval --json onto a user's file"] == "data loss"
    assert issue_37["a text too short for disjoint calibration and evaluation"] == "silently wrong"
