"""The study's Markdown tables, on synthetic rows."""

from __future__ import annotations

import json

from bench.study_report import main


def _row(model, method, nll, bits=None, group=None, calib=None):
    return {"model": model, "method": method, "bits": bits, "group_size": group, "calib": calib,
            "effective_bits": bits + 20 / 64 if bits else None, "parameters": 1e8, "hidden_size": 64,
            "fingerprint": "f",
            "tokens": {"overall": 100, "memorization": 10}, "nll": {"overall": nll, "memorization": nll + 2},
            "ppl": 2.718281828 ** nll}


def test_the_tables_hold_every_row_with_its_damage_and_per_channel_last(tmp_path, capsys):
    rows = [_row("m", "fp", 3.0), _row("m", "rtn", 4.5, 3, -1), _row("m", "rtn", 3.5, 3, 64),
            _row("m", "gptq", 3.25, 3, 64, 8)]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    holdout = tmp_path / "holdout.json"
    holdout.write_text(json.dumps({"rows": [{"model": "m", "config": "rtn-w3g96-asym", "calib": None, "checks": {
        "overall": {"damage": 0.9, "predicted": 1.0, "interval": [0.5, 2.0], "inside": True,
                    "ppl": 49.4, "ppl_predicted": 54.6, "ppl_interval": [33.1, 148.4]},
        "memorization": {"damage": 3.0, "predicted": 1.0, "interval": [0.5, 2.0], "inside": False}}}]}))
    assert main([str(path), "--holdout", str(holdout)]) == 0
    out = capsys.readouterr().out
    assert "| m | 100.0M | 20.09 | 3.000 (100) | 5.000 (10) |" in out
    rtn = [line for line in out.splitlines() if line.startswith("| m | 3 |") and "| 8 |" not in line]
    assert rtn == ["| m | 3 | 64 | 3.312 | 33.12 | 0.500 | 0.500 |", "| m | 3 | pc | 3.312 | 90.02 | 1.500 | 1.500 |"]
    assert "| m | 3 | 64 | 8 | 3.312 | 25.79 | 0.250 | 0.250 |" in out
    assert "| m | rtn-w3g96-asym | overall | 0.900 | 1.000 [0.500, 2.000] | yes | 49.40 | 54.60 [33.10, 148.40] |" in out
    assert "| memorization | 3.000 | 1.000 [0.500, 2.000] | **no** |" in out
