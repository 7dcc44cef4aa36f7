"""The README's Python example runs as written (on the embedded model)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.slow
def test_the_python_example_runs_as_written(tmp_path, monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "the README has no Python example"
    monkeypatch.chdir(tmp_path)  # it writes runs/... relative to where it runs
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    assert capsys.readouterr().out.startswith("verdict: ")
    assert (tmp_path / "runs/w3g64/config.json").is_file()
    assert (tmp_path / "runs/w3g64/diagnosis/report.html").is_file()
    assert type(namespace["model"].model.layers[0].mlp.up_proj).__name__ == "QuantLinear"
