"""The local folder of a served checkpoint, a hub id included, where its repair side files are read.

An engine is given a folder or a hub id.  A repaired checkpoint's corrections live in side files
beside the weights (:data:`bitcliff.serving.claim.SIDE_FILES`), which the plugin reads itself, so a
hub id is resolved to its snapshot in the Hugging Face cache: first its JSON files (config and
bitcliff's manifest, a few KB), and, only when the manifest lists side files, the safetensors
files too; they are the files the engine downloads next anyway, into the same cache (unless it
is given a ``download_dir`` of its own).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from bitcliff.serving.claim import SIDE_FILES
from bitcliff.storage import MANIFEST

log = logging.getLogger(__name__)


def local_folder(model: str | Path | None, revision: str | None = None) -> Path | None:
    """The folder holding ``model``'s files: ``model`` itself when it is a folder; for a hub id
    written by bitcliff with repair side files, its snapshot with them and the weights; else None
    (a hub checkpoint without side files: nothing is read beside the weights).

    A hub id that cannot be resolved (offline and not cached, no such repository) gives None and a
    warning: the engine's own download then reports what is wrong.
    """
    if model is None:
        return None
    if Path(model).is_dir():
        return Path(model)
    from huggingface_hub import constants, snapshot_download

    def fetch(patterns: list[str]) -> Path:
        return Path(snapshot_download(str(model), revision=revision, allow_patterns=patterns,
                                      local_files_only=constants.HF_HUB_OFFLINE))

    try:
        folder = fetch(["*.json"])
        try:
            listed = json.loads((folder / MANIFEST).read_text())["files"]
        except (OSError, ValueError, KeyError, TypeError):
            return None  # not written by bitcliff: no side files of its own
        if not any(name in SIDE_FILES for name in listed):
            return None
        return fetch(["*.json", "*.safetensors"])
    except (OSError, ValueError) as exc:  # huggingface_hub's errors: HTTP, offline, not cached, bad id
        log.warning("bitcliff: cannot resolve %s to local files to look for repair side files (%s)", model, exc)
        return None
