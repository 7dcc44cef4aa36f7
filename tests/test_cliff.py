"""The main job on a tiny model: every step runs, a second run reuses them, other settings in the
same folder are refused, and the report renders."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest

from bitcliff.cli import main
from bitcliff.cliff.schedule import usable_cores

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _argv(tiny_folder, out, *extra):
    return ["cliff", "--model", str(tiny_folder), "--text-file", str(tiny_folder.parent / "text.txt"),
            "--windows", "2", "--calib-samples", "4", "--repair-calib", "4", "--diagnosis-examples", "4",
            "--trace-examples", "2", "--group-size", "32", "--out", str(out), *extra]


@pytest.fixture(scope="module")
def run(tiny_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("cliff") / "run"
    assert main(_argv(tiny_folder, out)) == 0
    shutil.copy(out / "cliff.json", out.parent / "first-cliff.json")  # later tests run again in `out`
    return out


def test_every_step_is_recorded_and_reported(run, capsys):
    summary = json.loads((run / "cliff.json").read_text())
    assert [w["bits"] for w in summary["widths"]] == [4, 3, 2]
    for width in summary["widths"]:
        assert width["gptq"]["ppl"] > 1 and width["diagnosis"]["label"] in ("healthy", "degradation", "collapse", "mixed")
        assert (run / width["gptq"]["checkpoint"] / "config.json").is_file()
        assert (run / width["diagnosis"]["report"]).is_file()
    assert set(summary["continuations"]["texts"]) >= {"FP", "W4 GPTQ", "W3 GPTQ", "W2 GPTQ"}
    page = (run / "report.html").read_text()
    assert page.count("class='card") == 3 and "id='cliff-plot'" in page and "http" not in page.replace("https://", "")


def test_every_model_is_measured_against_full_precision_beside_its_perplexity(run):
    from bitcliff.cliff.report import table

    summary = json.loads((run / "cliff.json").read_text())
    for width in summary["widths"]:
        for key in ("rtn", "gptq", "repair"):
            model = width[key]
            assert model["kl_mean"] >= 0 and 0 <= model["same_top_pct"] <= 100, (width["bits"], key)
            low, high = model["kl_mean_ci95"]
            assert low <= model["kl_mean"] <= high
    w2 = summary["widths"][-1]
    assert w2["gptq"]["kl_mean"] > summary["widths"][0]["gptq"]["kl_mean"]  # 2 bits drift further than 4
    lines = table(summary).splitlines()
    kl_rows = [line for line in lines if line.split()[:1] == ["KL"]]
    assert len(kl_rows) == 3 and all("same top token:" in line for line in kl_rows)
    assert f"{w2['repair']['kl_mean']:.4f}" in kl_rows[-1]
    assert "KL RTN / GPTQ / repaired" in (run / "report.html").read_text()


def test_a_second_run_reuses_every_step(run, tiny_folder, monkeypatch, capsys):
    import bitcliff

    def no_work(*args, **kwargs):
        raise AssertionError("a finished step was computed again")

    monkeypatch.setattr(bitcliff, "quantize", no_work)
    monkeypatch.setattr(bitcliff, "diagnose", no_work)
    monkeypatch.setattr(bitcliff, "repair", no_work)
    assert main(_argv(tiny_folder, run)) == 0
    assert "continuations of" in capsys.readouterr().out


def _moved_run(run, tmp_path, text):
    """A copy of ``run`` whose settings name ``text`` (a copy of its text) as --text-file."""
    moved = tmp_path / "run"
    shutil.copytree(run, moved)
    state = json.loads((moved / "state.json").read_text())
    state["settings"]["text"] = str(text)
    (moved / "state.json").write_text(json.dumps(state))
    return moved


def test_a_text_edited_under_the_same_name_is_not_resumed(run, tiny_folder, tmp_path, monkeypatch, capsys):
    import bitcliff

    text = tmp_path / "text.txt"
    shutil.copy(tiny_folder.parent / "text.txt", text)
    moved = _moved_run(run, tmp_path, text)
    argv = [a if a != str(tiny_folder.parent / "text.txt") else str(text) for a in _argv(tiny_folder, moved)]

    def no_work(*args, **kwargs):
        raise AssertionError("a finished step was computed again")

    monkeypatch.setattr(bitcliff, "quantize", no_work)
    assert main(argv) == 0  # the same content under another path: every step is reused
    capsys.readouterr()
    text.write_text(text.read_text().replace("w1 ", "w2 "))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "holds a run with other settings (text_sha256); the content of --text-file changed since" in err


def test_a_model_folder_changed_under_the_same_name_is_not_resumed(run, tiny_folder, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_folder, model)
    config = json.loads((model / "config.json").read_text())
    config["rms_norm_eps"] = 1e-3  # another model, with the same input embeddings
    (model / "config.json").write_text(json.dumps(config))
    moved = tmp_path / "run"
    shutil.copytree(run, moved)
    argv = [a if a != str(tiny_folder) else str(model) for a in _argv(tiny_folder, moved)]
    state = json.loads((moved / "state.json").read_text())
    state["settings"]["model"] = str(model)
    (moved / "state.json").write_text(json.dumps(state))
    assert main(argv) == 2
    assert "(model_folder_sha256); the --model folder changed since" in capsys.readouterr().err


def test_other_settings_in_the_same_folder_are_refused(run, tiny_folder, capsys):
    assert main(_argv(tiny_folder, run, "--budget", "0.5")) == 2
    assert "holds a run with other settings (budget)" in capsys.readouterr().err


@pytest.mark.parametrize("extra,message", [
    (["--bits", "5"], "bits must be one of"),
    (["--budget", "-1"], "--budget: budget must be a finite number of extra bits per weight >= 0"),
    (["--budget", "inf"], "--budget: budget must be a finite number of extra bits per weight >= 0"),
    (["--bits", "3", "3"], "bits must be distinct"),
])
def test_bad_settings_are_refused_before_any_work(tiny_folder, tmp_path, extra, message, capsys):
    assert main(_argv(tiny_folder, tmp_path / "x", *extra)) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_a_folder_of_someone_elses_files_is_left_alone(tiny_folder, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep")
    assert main(_argv(tiny_folder, out)) == 2
    assert "is not a cliff run" in capsys.readouterr().err and (out / "notes.txt").read_text() == "keep"


@pytest.mark.skipif(CHROMIUM is None, reason="needs a chromium browser (apt install chromium)")
def test_the_report_renders_in_chromium(run):
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--dump-dom", (run / "report.html").as_uri()]
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout
    assert "The cliff" in dom and re.search(r"verdict: \w+", dom)
    assert dom.count("class=\"card") == 3 and 'id="cliff-plot"' in dom


def test_one_worker_gives_the_numbers_of_two(run, tiny_folder, tmp_path):
    assert main(_argv(tiny_folder, tmp_path / "one", "--workers", "1")) == 0

    def numbers(folder):
        summary = json.loads((folder / "cliff.json").read_text())
        strip = lambda step: {k: v for k, v in step.items() if k not in ("seconds", "peak_gpu_gib", "outputs")}  # noqa: E731
        return [{k: strip(w[k]) for k in ("rtn", "gptq", "diagnosis", "repair")} for w in summary["widths"]]

    first = json.loads((run.parent / "first-cliff.json").read_text())
    assert first["workers"] == (2 if usable_cores() >= 2 else 1)
    assert numbers(tmp_path / "one") == numbers(run)


def test_a_step_whose_folder_was_deleted_or_changed_is_computed_again(run, tiny_folder, capsys):
    state = json.loads((run / "state.json").read_text())["steps"]
    checkpoint = run / state["gptq-w3"]["checkpoint"]
    shutil.rmtree(checkpoint)
    report = run / state["diagnosis-w4"]["report"]
    report.write_text(report.read_text() + "<!-- edited -->")
    assert main(_argv(tiny_folder, run)) == 0
    err = capsys.readouterr().err
    # what was computed from them too: the W3 diagnosis and repair, the continuations
    assert ("computing again continuations, diagnosis-w3, diagnosis-w4, gptq-w3, repair-w3, repair-w4: "
            "a folder they wrote or read was deleted or changed") in err
    assert (checkpoint / "config.json").is_file()
    again = json.loads((run / "state.json").read_text())["steps"]
    assert again["gptq-w3"]["ppl"] == state["gptq-w3"]["ppl"]
    assert again["rtn-w3"] == state["rtn-w3"]  # untouched steps are kept as they were


@pytest.mark.parametrize("budget", [float("inf"), float("nan"), -0.5])
def test_a_budget_repair_would_refuse_is_refused_by_the_settings(budget):
    """One validator for cliff's and repair's budget: refused before any work, never saved as
    ``Infinity`` in ``state.json`` (which is not JSON)."""
    from bitcliff.cliff.run import CliffSettings

    with pytest.raises(ValueError, match="^budget must be a finite number"):
        CliffSettings(budget=budget)


def test_a_run_folder_older_than_the_fingerprints(tmp_path):
    """An older run of an embedded text is resumed (its cached file is checked by digest) and its
    fingerprint recorded; one of a user's text is refused: its results cannot be tied to the text."""
    from bitcliff.cliff.run import StepStore

    older = {"text": "wiki", "budget": 0.25}
    StepStore.open(tmp_path / "embedded", older).put("fp", {"ppl": 2.0})
    now = {**older, "text_sha256": "ab"}
    store = StepStore.open(tmp_path / "embedded", now, adoptable=frozenset({"text_sha256"}))
    assert store.steps == {"fp": {"ppl": 2.0}}
    assert json.loads((tmp_path / "embedded" / "state.json").read_text())["settings"] == now
    StepStore.open(tmp_path / "user", {"text": "t.txt"}).put("fp", {"ppl": 2.0})
    with pytest.raises(ValueError, match=r"other settings \(text_sha256\); it was written before its inputs' content "
                                         r"was recorded \(text_sha256\)"):
        StepStore.open(tmp_path / "user", {"text": "t.txt", "text_sha256": "ab"})
