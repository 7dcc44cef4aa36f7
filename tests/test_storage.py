"""Atomic writes, the cache root, and output folders that never lose a user's files."""

from __future__ import annotations

import json
import os
import shutil
import stat

import pytest

from bitcliff.storage import (
    MANIFEST,
    OccupiedOutputError,
    cache_root,
    check_replaceable,
    replace_folder,
    write_json,
    write_output,
)


def test_cache_root_env_and_xdg(tmp_path, monkeypatch):
    monkeypatch.setenv("BITCLIFF_CACHE", str(tmp_path / "a" / "b"))
    assert cache_root() == tmp_path / "a" / "b"
    assert (tmp_path / "a" / "b").is_dir()
    monkeypatch.delenv("BITCLIFF_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "bitcliff"


def _fill(text):
    def fill(tmp):
        (tmp / "a.txt").write_text(text)
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.txt").write_text(text)

    return fill


def test_replace_folder_writes_a_manifest_and_replaces_only_its_own_files(tmp_path):
    out = tmp_path / "out"
    replace_folder(out, _fill("one"), overwrite=False, kind="test")
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest == {"kind": "test", "files": ["a.txt", "sub/b.txt"]}
    with pytest.raises(OccupiedOutputError, match="already exists and is not empty"):
        replace_folder(out, _fill("two"), overwrite=False, kind="test")
    replace_folder(out, _fill("two"), overwrite=True, kind="test")
    assert (out / "a.txt").read_text() == "two"

    (out / "notes.txt").write_text("mine")  # a user's file inside a folder bitcliff wrote
    with pytest.raises(OccupiedOutputError, match="holds notes.txt, which bitcliff did not write"):
        replace_folder(out, _fill("three"), overwrite=True, kind="test")
    assert (out / "notes.txt").read_text() == "mine" and (out / "a.txt").read_text() == "two"
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no temporary folder left


def test_a_folder_bitcliff_did_not_write_is_never_replaced(tmp_path):
    out = tmp_path / "data"
    out.mkdir()
    (out / "data.csv").write_text("1,2")
    (out / "notes.txt").write_text("keep")
    with pytest.raises(OccupiedOutputError, match=r"holds data.csv \(and 1 more\)"):
        check_replaceable(out, overwrite=True)
    with pytest.raises(OccupiedOutputError):
        replace_folder(out, _fill("x"), overwrite=True, kind="test")
    assert sorted(os.listdir(out)) == ["data.csv", "notes.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    replace_folder(empty, _fill("x"), overwrite=False, kind="test")  # an empty folder is fine
    (tmp_path / "file").write_text("x")
    with pytest.raises(OccupiedOutputError, match="is not a folder"):
        check_replaceable(tmp_path / "file", overwrite=True)


def test_a_nested_bitcliff_output_is_never_deleted_with_its_parent(tmp_path):
    """overwrite replaces one output: a report or a one-file result kept inside is named, kept."""
    out = tmp_path / "ckpt"
    replace_folder(out, _fill("x"), overwrite=False, kind="checkpoint")
    replace_folder(out / "diagnosis", _fill("y"), overwrite=False, kind="diagnosis")
    check_replaceable(out / "diagnosis", overwrite=True)  # itself, it is replaceable
    with pytest.raises(OccupiedOutputError, match=r"holds diagnosis, a bitcliff output of its own \(diagnosis\)"):
        replace_folder(out, _fill("z"), overwrite=True, kind="checkpoint")
    assert (out / "diagnosis" / "a.txt").read_text() == "y"
    shutil.rmtree(out / "diagnosis")
    write_output(out / "eval.json", {"ppl": 1.0}, overwrite=False, kind="eval")
    with pytest.raises(OccupiedOutputError, match=r"holds eval.json, a bitcliff output of its own \(eval\)"):
        check_replaceable(out, overwrite=True)


def test_a_one_file_output_replaces_only_a_file_bitcliff_wrote(tmp_path):
    mine = tmp_path / "notes.json"
    mine.write_text('{"a": 1}')
    for overwrite in (False, True):
        with pytest.raises(OccupiedOutputError):
            write_output(mine, {"ppl": 1.0}, overwrite=overwrite, kind="eval")
    assert mine.read_text() == '{"a": 1}'
    ours = tmp_path / "r.json"
    write_output(ours, {"ppl": 1.0}, overwrite=False, kind="eval")
    with pytest.raises(OccupiedOutputError, match="--overwrite"):
        write_output(ours, {"ppl": 2.0}, overwrite=False, kind="eval")
    write_output(ours, {"ppl": 2.0}, overwrite=True, kind="eval")
    assert json.loads(ours.read_text()) == {"bitcliff_output": "eval", "ppl": 2.0}


def test_a_symbolic_link_is_followed_and_kept(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    replace_folder(tmp_path / "link", _fill("one"), overwrite=False, kind="test")
    replace_folder(tmp_path / "link", _fill("two"), overwrite=True, kind="test")
    assert (tmp_path / "link").is_symlink() and (tmp_path / "real" / "a.txt").read_text() == "two"
    assert sorted(os.listdir(tmp_path)) == ["link", "real"]


def test_an_error_while_filling_leaves_nothing_behind(tmp_path):
    out = tmp_path / "out"
    replace_folder(out, _fill("old"), overwrite=False, kind="test")

    def broken(tmp):
        (tmp / "a.txt").write_text("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        replace_folder(out, broken, overwrite=True, kind="test")
    assert (out / "a.txt").read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_files_and_folders_get_the_users_umask(tmp_path):
    old = os.umask(0o022)
    try:
        replace_folder(tmp_path / "out", _fill("x"), overwrite=False, kind="test")
        write_json(tmp_path / "one.json", {"a": 1})
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(os.stat(p).st_mode)  # noqa: E731
    assert mode(tmp_path / "out") == 0o755 and mode(tmp_path / "out" / "sub") == 0o755
    assert mode(tmp_path / "out" / "a.txt") == 0o644 and mode(tmp_path / "one.json") == 0o644
