"""Full-precision predictions kept on disk, so that a second checkpoint of the same model is measured
against them without running the full-precision model again.

A file holds one :class:`~bitcliff.divergence.ReferencePredictions`: per predicted position the
``top_k`` largest log-probabilities (float32) and their tokens (int32), the rest of the vocabulary as
one log-probability, and the next token's NLL; ``8 * top_k + 8`` bytes per position (8200 at the
default 1024, where SmolLM2's full fp16 logits take 98 304), plus the windows themselves: 67 MB for
``bitcliff eval``'s default 16 windows of 512 tokens.  KL measured against them is a lower bound of
the full-vocabulary KL (:func:`~bitcliff.divergence.bucketed_divergence`); on SmolLM2 at W4, W3 and
W2 it is 3.2, 2.5 and 1.7 % below it (``bench/kl_top_k.py``); same top token is exact.

It is found by a key of everything the predictions depend on: every weight of the model (names,
dtypes, shapes and values: :func:`bitcliff.models.weights_fingerprint`), the windows' token ids, ``top_k`` and the
file layout's version.  A file is trusted only whole: its key, the digest of its tensors, their
shapes and finiteness are checked on every read, and a file that fails any check is computed again
and replaced (atomically: a reader never sees half a file).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch

from bitcliff.divergence import TOP_K, ReferencePredictions, reference_predictions
from bitcliff.models import weights_fingerprint
from bitcliff.storage import cache_root, safetensors_complete, save_tensors

log = logging.getLogger(__name__)

#: The layout of a cache file; a change makes older files misses, never misreads.
LAYOUT = 1
#: The tensors of a file, in the order their digest is taken.
FIELDS = ("top_logprobs", "top_ids", "rest_logprob", "nll", "eval_ids")
_KEY, _DIGEST = "bitcliff_reference", "sha256"


def cache_key(model: torch.nn.Module, eval_ids: torch.Tensor, top_k: int) -> dict:
    """What the predictions of ``model`` on ``eval_ids`` (int64 ``[W, T]``) depend on."""
    ids = eval_ids.to(torch.int64).contiguous()
    return {
        "layout": LAYOUT,
        "weights": weights_fingerprint(model),
        "eval_ids": hashlib.sha256(ids.numpy().tobytes()).hexdigest(),
        "windows": list(ids.shape),
        "top_k": int(top_k),
    }


def cache_file(key: dict, cache_dir: Path | None = None) -> Path:
    """Where the predictions of ``key`` live (under ``cache_root()/reference`` by default)."""
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:40]
    return (cache_dir if cache_dir is not None else cache_root() / "reference") / f"{name}.safetensors"


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for field in FIELDS:
        digest.update(tensors[field].contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def read_predictions(path: Path, key: dict) -> ReferencePredictions | None:
    """The predictions stored at ``path`` for ``key``; None when the file is missing, or is not
    whole, not of ``key``, or damaged (every such case but a missing file is logged)."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        if not safetensors_complete(path):
            raise ValueError("the file is shorter than its header says")
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            if json.loads(metadata.get(_KEY, "null")) != key:
                raise ValueError("it was made for another model, other windows or another top_k")
            tensors = {field: f.get_tensor(field) for field in FIELDS}
        if _digest(tensors) != metadata.get(_DIGEST):
            raise ValueError("its tensors do not match their digest")
        predictions = ReferencePredictions(**tensors)
        _check_shapes(predictions, key)
        return predictions
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:  # safetensors raises its own too
        log.warning("bitcliff: the cached full-precision predictions %s cannot be used (%s); computing them again",
                    path, exc)
        return None


def _check_shapes(p: ReferencePredictions, key: dict) -> None:
    w, t = key["windows"]
    k = p.top_ids.shape[-1]
    expected = {"top_logprobs": (w, t - 1, k), "top_ids": (w, t - 1, k), "rest_logprob": (w, t - 1),
                "nll": (w, t - 1), "eval_ids": (w, t)}
    for field, shape in expected.items():
        if tuple(getattr(p, field).shape) != shape:
            raise ValueError(f"{field} is {tuple(getattr(p, field).shape)}, not {shape}")
    if not (1 <= k <= key["top_k"]) or not torch.isfinite(p.top_logprobs).all() or not torch.isfinite(p.nll).all():
        raise ValueError("it holds values no prediction has (non-finite log-probabilities or NLL, or a wrong top_k)")
    if hashlib.sha256(p.eval_ids.to(torch.int64).contiguous().numpy().tobytes()).hexdigest() != key["eval_ids"]:
        raise ValueError("its windows are not the ones asked for")


def write_predictions(path: Path, key: dict, predictions: ReferencePredictions) -> Path:
    """Store ``predictions`` for ``key`` at ``path`` atomically."""
    tensors = {field: getattr(predictions, field).detach().cpu().contiguous() for field in FIELDS}
    metadata = {_KEY: json.dumps(key, sort_keys=True), _DIGEST: _digest(tensors)}
    return save_tensors(tensors, path, metadata=metadata)


def cached_reference_predictions(reference: torch.nn.Module, eval_ids: torch.Tensor, top_k: int = TOP_K,
                                 cache_dir: str | Path | None = None, batch_size: int = 1,
                                 progress: bool = True) -> ReferencePredictions:
    """:func:`~bitcliff.divergence.reference_predictions` of ``reference`` on ``eval_ids`` (int64
    ``[W, T]``), read from the cache when a whole file of the same key is there, else computed
    and stored.

    Args:
        reference: the full-precision model.
        eval_ids: int64 ``[W, T]`` evaluation windows.
        top_k: tokens kept per position.
        cache_dir: where the files live; None for ``cache_root()/reference``.
        batch_size, progress: as :func:`~bitcliff.divergence.reference_predictions`.
    """
    key = cache_key(reference, eval_ids, top_k)
    path = cache_file(key, None if cache_dir is None else Path(cache_dir))
    stored = read_predictions(path, key)
    if stored is not None:
        return stored
    predictions = reference_predictions(reference, eval_ids, top_k, batch_size, progress)
    try:
        write_predictions(path, key, predictions)
    except OSError as exc:  # a full or read-only cache costs the next run time, not this one its result
        log.warning("bitcliff: the full-precision predictions could not be cached at %s (%s)", path, exc)
    return predictions
