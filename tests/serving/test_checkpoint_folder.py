"""A served checkpoint's local folder: a folder as given, a hub id through the Hugging Face cache
(offline here: the cache is laid out by hand, as a download leaves it)."""

from __future__ import annotations

import json
import logging

import pytest

from bitcliff.serving.checkpoint_folder import local_folder
from bitcliff.storage import MANIFEST

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture()
def hub_cache(tmp_path, monkeypatch):
    """An offline Hugging Face cache under ``tmp_path``; returns ``add(repo_id, files)``."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    def add(repo_id: str, files: dict[str, str]):
        repo = cache / ("models--" + repo_id.replace("/", "--"))
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text(COMMIT)
        snapshot = repo / "snapshots" / COMMIT
        snapshot.mkdir(parents=True)
        for name, text in files.items():
            (snapshot / name).write_text(text)
        return snapshot

    return add


def manifest(*files: str) -> str:
    return json.dumps({"kind": "checkpoint", "files": ["config.json", "model.safetensors", *files]})


def test_a_folder_is_itself(tmp_path):
    assert local_folder(str(tmp_path)) == tmp_path
    assert local_folder(None) is None


def test_a_hub_id_with_side_files_is_its_cached_snapshot(hub_cache):
    snapshot = hub_cache("someone/smol-w3-repaired", {
        "config.json": "{}", MANIFEST: manifest("lowrank.safetensors"),
        "model.safetensors": "", "lowrank.safetensors": ""})
    assert local_folder("someone/smol-w3-repaired") == snapshot


def test_a_hub_id_without_side_files_needs_no_folder(hub_cache):
    hub_cache("someone/smol-w3", {"config.json": "{}", MANIFEST: manifest()})
    hub_cache("someone/peer-gptq", {"config.json": "{}"})  # no manifest: not bitcliff's
    assert local_folder("someone/smol-w3") is None
    assert local_folder("someone/peer-gptq") is None


def test_an_id_that_cannot_be_resolved_warns_and_gives_none(hub_cache, caplog):
    with caplog.at_level(logging.WARNING, logger="bitcliff.serving.checkpoint_folder"):
        assert local_folder("someone/not-cached") is None
        assert local_folder("not/a/valid/id") is None
    assert caplog.text.count("cannot resolve") == 2 and "someone/not-cached" in caplog.text
