"""The study sweep on a tiny model: rows as they finish, resume without repeats, refusals; fit and
predict through the command line."""

from __future__ import annotations

import json

import pytest

from bitcliff.study import sweep as sweep_module
from bitcliff.study.sweep import (
    Configuration,
    SweepSettings,
    grid,
    read_rows,
    run_sweep,
)

SETTINGS = SweepSettings(text="", windows=2, seq_len=64, calib_seq_len=32, strata=("overall", "utilization"))


@pytest.fixture
def settings(tiny_folder):
    return SweepSettings(**{**SETTINGS.__dict__, "text": str(tiny_folder.parent / "text.txt")})


def test_the_grid_trims_gptq_to_the_calibration_axis_at_g64():
    configs = grid(["m"], [2, 3], [32, 64, -1], [8, 16], ["rtn", "gptq"])
    assert configs[0] == Configuration("m", "fp")
    gptq = [(c.bits, c.group_size, c.calib) for c in configs if c.method == "gptq"]
    assert gptq == [(2, 32, 16), (2, 64, 8), (2, 64, 16), (2, -1, 16), (3, 32, 16), (3, 64, 8), (3, 64, 16), (3, -1, 16)]
    assert len([c for c in configs if c.method == "rtn"]) == 6
    assert len(grid(["m"], [2], [32, 64], [8, 16], ["gptq"], full_gptq=True)) == 1 + 4
    with pytest.raises(ValueError, match="unknown method 'awq'"):
        grid(["m"], [2], [64], [8], ["awq"])
    with pytest.raises(ValueError, match="GPTQ rows need calibration sizes"):
        grid(["m"], [2], [64], [], ["gptq"])


def test_an_interrupted_sweep_resumes_without_repeating_or_losing_rows(tiny_folder, tmp_path, settings, monkeypatch):
    from bitcliff.study import strata

    model = str(tiny_folder)
    configs = grid([model], [2, 3], [32], [4], ["rtn", "gptq"])
    real, calls = strata.measure_strata, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the fp row reads its reference predictions: the rtn rows measure
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(strata, "measure_strata", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(tmp_path / "s", configs, settings, progress=False)
    first = read_rows(tmp_path / "s")
    assert [r["method"] for r in first] == ["fp", "rtn"]
    monkeypatch.setattr(strata, "measure_strata", real)
    rows = run_sweep(tmp_path / "s", configs, settings, progress=False)
    assert rows[:2] == first
    keys = [(r["method"], r.get("bits"), r.get("group_size"), r.get("calib")) for r in rows]
    assert len(keys) == len(set(keys)) == len(configs)
    assert all(set(r["nll"]) == set(r["kl"]) == set(r["same_top_pct"]) == {"overall", "utilization"} for r in rows)
    fp, quantized = rows[0], rows[1:]
    assert set(fp["kl"].values()) == {0.0} and set(fp["same_top_pct"].values()) == {100.0}
    from bitcliff.models import load_fp_model
    from bitcliff.study.strata import build_strata

    model, tokenizer, _ = load_fp_model(str(tiny_folder))
    strata_now = build_strata(tokenizer, (tiny_folder.parent / "text.txt").read_text(), settings.windows,
                              settings.seq_len, settings.strata)
    again = strata.measure_strata(model, strata_now, strata.reference_strata(model, strata_now))
    assert again["nll"] == pytest.approx(fp["nll"], rel=1e-6)  # the reference's NLL is a forward's NLL
    assert all(abs(v) < 1e-5 for v in again["kl"].values())
    assert all(v > 0 for r in quantized for v in r["kl"].values())
    two_bit = [r for r in quantized if r["bits"] == 2]
    assert all(r["kl"]["overall"] > q["kl"]["overall"] for r in two_bit for q in quantized if q["bits"] == 3
               and q["method"] == r["method"])  # fewer bits, further from fp
    gptq = [r for r in rows if r["method"] == "gptq"]
    assert gptq and all(r["calib"] == 4 and r["effective_bits"] > r["bits"] for r in gptq)


def test_a_folder_of_other_settings_or_another_model_is_refused(tiny_folder, tmp_path, settings):
    model = str(tiny_folder)
    configs = grid([model], [3], [32], [], ["rtn"])
    run_sweep(tmp_path / "s", configs[:1], settings, progress=False)
    other = SweepSettings(**{**settings.__dict__, "windows": 3})
    with pytest.raises(ValueError, match=r"other settings \(windows\)"):
        run_sweep(tmp_path / "s", configs, other, progress=False)
    rows_file = tmp_path / "s" / sweep_module.ROWS_FILE
    row = json.loads(rows_file.read_text())
    rows_file.write_text(json.dumps({**row, "fingerprint": "0123456789abcdef"}) + "\n")
    with pytest.raises(ValueError, match="rows of another model named"):
        run_sweep(tmp_path / "s", configs, settings, progress=False)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a sweep folder"):
        run_sweep(tmp_path / "busy", configs, settings, progress=False)
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"


def test_the_sweep_command_measures_the_grid(tiny_folder, tmp_path, capsys):
    from bitcliff.cli import main

    out = tmp_path / "s"
    args = ["study", "sweep", "--models", str(tiny_folder), "--bits", "2", "4", "--group-sizes", "32",
            "--methods", "rtn", "--text-file", str(tiny_folder.parent / "text.txt"), "--windows", "2",
            "--strata", "overall", "utilization", "--out", str(out)]
    assert main(args) == 0, capsys.readouterr().err
    assert [r["method"] for r in read_rows(out)] == ["fp", "rtn", "rtn"]
    assert main(["study", "sweep", "--models", str(tiny_folder), "--strata", "reasoning", "--out", str(tmp_path / "x")]) == 2
    assert "unknown stratum 'reasoning'" in capsys.readouterr().err
    assert main(["study", "sweep", "--models", str(tiny_folder), "--group-sizes", "50", "--out", str(tmp_path / "x")]) == 2
    assert "multiple of 16" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_fit_and_predict_from_the_command_line(tmp_path, capsys):
    """On rows of a planted law (a real sweep takes minutes per row)."""
    import math

    from test_study_law import synthetic_rows

    from bitcliff.cli import main

    out = tmp_path / "s"
    out.mkdir()
    (out / sweep_module.SETTINGS_FILE).write_text(json.dumps(SETTINGS.to_dict()))
    rows = [r for r in synthetic_rows() if r["parameters"] == 8e6]
    fp = {"model": "m", "method": "fp", "parameters": 8e6, "hidden_size": 256, "fingerprint": "f",
          "nll": {"overall": 3.0, "utilization": 1.0}}
    lines = [fp] + [{**r, "model": "m", "bits": round(r["effective_bits"]), "fingerprint": "f",
                     "nll": {"overall": 3.0 + r["damage"]["overall"], "utilization": 1.0 + r["damage"]["utilization"]}}
                    for r in rows]
    (out / sweep_module.ROWS_FILE).write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert main(["study", "fit", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "overall/gptq: damage = e^" in printed and "most sensitive to b_eff" in printed
    assert (out / "law.json").is_file() and (out / "law-gptq.png").is_file()
    assert main(["study", "predict", str(out / "law.json"), "--model", "m", "--bits", "3", "--group-size", "96",
                 "--calib", "24", "--json"]) == 0
    prediction = json.loads(capsys.readouterr().out)
    overall = next(p for p in prediction["predictions"] if p["stratum"] == "overall")
    assert overall["ppl_interval"][0] <= overall["ppl"] <= overall["ppl_interval"][1]
    assert overall["ppl"] == pytest.approx(math.exp(3.0 + overall["damage"]))
    assert prediction["warnings"] == []
    assert main(["study", "predict", str(out), "--model", "m", "--bits", "2", "--group-size", "512", "--calib", "8"]) == 0
    assert "warning: overall/gptq: predicting outside the fitted range" in capsys.readouterr().out
    assert main(["study", "predict", str(out), "--model", "gemma3-270m", "--bits", "3", "--calib", "8"]) == 2
    assert "is not in this law's sweep" in capsys.readouterr().err
    assert main(["study", "predict", str(out), "--model", "m", "--bits", "3"]) == 2
    assert "need the calibration windows" in capsys.readouterr().err
    assert main(["study", "fit", str(tmp_path / "nothing")]) == 2
    assert "not a study sweep folder" in capsys.readouterr().err
