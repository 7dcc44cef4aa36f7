"""Resumable row files: rows read back in order, reruns skip what is there, damage is named."""

from __future__ import annotations

import pytest

from bitcliff.rows import RowsError, append_row, done_keys, read_rows


def test_rows_append_and_read_back(tmp_path):
    path = tmp_path / "sub" / "rows.jsonl"
    assert read_rows(path) == [] and done_keys(path, ("a",)) == set()
    append_row(path, {"a": 1, "b": 2})
    append_row(path, {"a": 2, "b": 3})
    assert read_rows(path) == [{"a": 1, "b": 2}, {"a": 2, "b": 3}]
    assert done_keys(path, ("a", "b")) == {(1, 2), (2, 3)}


def test_a_damaged_row_is_named_by_file_and_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    append_row(path, {"a": 1})
    with path.open("a") as f:
        f.write('{"a": 2, "b": [1, \n')  # a row cut short by a crash
    with pytest.raises(RowsError, match=r"rows.jsonl, line 2: not a JSON row"):
        read_rows(path)
    path.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(RowsError, match="line 2: a row must be a JSON object"):
        read_rows(path)
