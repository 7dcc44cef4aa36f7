"""The README's Python example runs as written (on the embedded model)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.slow
def test_the_python_examples_run_as_written(tmp_path, monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 2, "the README lacks its Python examples (bitcliff's API, then from_pretrained)"
    monkeypatch.chdir(tmp_path)  # they write runs/... relative to where they run
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    assert capsys.readouterr().out.startswith("verdict: ")
    assert (tmp_path / "runs/w3g64/config.json").is_file()
    assert (tmp_path / "runs/w3g64/diagnosis/report.html").is_file()
    assert namespace["result"].bits_per_weight <= 0.25
    assert (tmp_path / "runs/w3g64-r/config.json").is_file()
    exec(compile(blocks[1], "README.md", "exec"), namespace)  # the same namespace: the first block's imports
    assert (tmp_path / "runs/w3g64-hf/config.json").is_file()
    assert type(namespace["model"].model.layers[0].mlp.up_proj).__name__ == "QuantLinear"  # quantized on load
