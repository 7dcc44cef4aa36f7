"""The embedded texts, prepared once from package registries (docs/architecture.md, section 3).

* ``wiki``: the shortened English Wikipedia dump in gensim's wheel, as prose (:mod:`bitcliff.corpus`);
* ``canterbury``: the Canterbury corpus's four English books, from brotli's source archive.

Each is cached under :func:`bitcliff.storage.cache_root`, written atomically, and checked against
what was prepared before it is read.
"""

from __future__ import annotations

import bz2
import json
import logging
import os
import re
from pathlib import Path

from bitcliff.assets.pypi import PackagedFile, obtain
from bitcliff.assets.status import AssetStatus
from bitcliff.corpus import STRIP_VERSION, dump_to_text
from bitcliff.storage import cache_root, file_intact, file_record, scratch, write_text

logger = logging.getLogger(__name__)

#: The Wikipedia sample: gensim's shortened test dump.
WIKI_DUMP = PackagedFile(
    "gensim",
    "4.4.0",
    "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
    "a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d",
)
# The Canterbury corpus's four English books, shipped as test data in brotli's source archive: a
# second text that is not Wikipedia (Alice in Wonderland, As You Like It, a 1990s Library of
# Congress report, Paradise Lost), for checking that a repair is not fitted to the calibration text.
CANTERBURY = tuple(
    PackagedFile("brotli", "1.2.1", f"brotli-1.2.1/tests/testdata/{name}", digest, sdist=True)
    for name, digest in (
        ("alice29.txt", "7467306ee0feed4971260f3c87421154a05be571d944e9cb021a5713700c38f0"),
        ("asyoulik.txt", "eaa3526fe53859f34ecdf255712f9ecf0b2c903451d4755b2edaa2e2599cb0fc"),
        ("lcet10.txt", "5314ba1dbb03f471df88bec6cd120a938ef60d0fd3511c5c1dce61bf7463245f"),
        ("plrabn12.txt", "07e2e0b461af78c7c647cb53dab39de560198e16f799b4516eccf0fbd69f764c"),
    )
)
TEXTS = ("wiki", "canterbury")


def load_text(name_or_path: str = "wiki") -> str:
    """The text behind a ``--text-file`` value.

    Args:
        name_or_path: ``"wiki"`` (the embedded corpus, prepared on first use) or the path of
            a UTF-8 text file.
    Returns:
        The whole text.
    Raises:
        ValueError: an empty or non-UTF-8 file, a folder, or an unknown name.
        AssetError: the corpus could not be fetched.
    """
    name_or_path = os.fspath(name_or_path)
    if name_or_path.strip().lower() in TEXTS:
        return prepare_text(name_or_path.strip().lower()).read_text(encoding="utf-8")
    path = Path(name_or_path).expanduser()
    if path.is_file():
        try:
            text = path.read_text(encoding="utf-8-sig")  # -sig: tolerate a leading BOM
        except UnicodeDecodeError as error:
            raise ValueError(f"text file {str(path)!r} is not UTF-8: {error}") from error
        if not text.strip():
            raise ValueError(f"text file {str(path)!r} is empty")
        return text
    if path.exists():
        raise ValueError(f"text {name_or_path!r} is not a file")
    raise ValueError(
        f"unknown text {name_or_path!r}: expected one of {', '.join(map(repr, TEXTS))} "
        "or the path of an existing UTF-8 text file"
    )


def describe_texts() -> list[AssetStatus]:
    """The embedded corpus for :func:`bitcliff.assets.describe_assets`; prepares nothing."""
    description = "~100 English Wikipedia articles, markup stripped (gensim's test dump)"
    return [AssetStatus("wiki", [], "text", description, [WIKI_DUMP.requirement], str(_wiki_path()),
                        _wiki_ready(_wiki_path()))]


def _wiki_path() -> Path:
    return cache_root() / "corpus" / "wiki.txt"


def _wiki_ready(path: Path) -> bool:
    """Whether the corpus exists and was made by the current markup stripper.

    The metadata file beside it is written after the text, so it doubles as the marker.
    """
    try:
        meta = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return meta.get("strip_version") == STRIP_VERSION and _text_intact(path, meta)


def _text_intact(path: Path, meta: dict) -> bool:
    """Whether a prepared text file is whole: as recorded (``file``), or, recorded before files
    were, of the recorded length in characters."""
    if isinstance(meta.get("file"), dict):
        intact = file_intact(path, meta["file"])
    else:
        try:
            intact = len(path.read_text(encoding="utf-8")) == meta.get("chars")
        except (OSError, ValueError):
            intact = False
    if not intact and path.exists():
        logger.warning("the cached text %s is damaged (not what was prepared); preparing it again", path)
    return intact


def _prepare_wiki() -> Path:
    """The cleaned corpus file, built if the cache lacks it."""
    path = _wiki_path()
    if _wiki_ready(path):
        return path
    logger.info("preparing the wiki corpus into %s", path)
    with scratch(cache_root()) as work:
        dump = obtain([WIKI_DUMP], work, cache_root())[WIKI_DUMP]
        with bz2.open(dump, "rb") as xml_file:
            text = dump_to_text(xml_file)
    write_text(path, text)
    meta = {
        "source": WIKI_DUMP.requirement,
        "member": WIKI_DUMP.member,
        "sha256": WIKI_DUMP.sha256,
        "strip_version": STRIP_VERSION,
        "chars": len(text),
        "file": file_record(path),
    }
    write_text(path.with_suffix(".json"), json.dumps(meta, indent=2) + "\n")
    logger.info("wiki corpus: %d characters", len(text))
    return path


def prepare_text(name: str) -> Path:
    """The cached file of an embedded text, built if the cache lacks it."""
    return _prepare_wiki() if name == "wiki" else _prepare_canterbury()


def _canterbury_path() -> Path:
    return cache_root() / "corpus" / "canterbury.txt"


def _prepare_canterbury() -> Path:
    """The four Canterbury books joined by blank lines; runs of spaces (the books' hard
    indentation) collapsed, lines trimmed, runs of blank lines made one; built if the cache
    lacks it."""
    path = _canterbury_path()
    try:
        if _text_intact(path, json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))):
            return path
    except (OSError, ValueError):
        pass
    logger.info("preparing the Canterbury texts into %s", path)
    with scratch(cache_root()) as work:
        files = obtain(CANTERBURY, work, cache_root())
        books = [files[f].read_text(encoding="latin-1") for f in CANTERBURY]
    cleaned = ["\n".join(re.sub(r"[ \t]+", " ", line).strip() for line in book.replace("\x1a", "").splitlines())
               for book in books]
    text = re.sub(r"\n{3,}", "\n\n", "\n\n".join(b.strip() for b in cleaned))
    write_text(path, text)
    meta = {"sources": [f.member for f in CANTERBURY], "package": CANTERBURY[0].requirement, "chars": len(text),
            "file": file_record(path)}
    write_text(path.with_suffix(".json"), json.dumps(meta, indent=2) + "\n")
    return path
