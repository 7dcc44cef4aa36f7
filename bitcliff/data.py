"""Token windows for calibration and evaluation (the evaluation protocol of docs/architecture.md).

The text is split in two disjoint parts, so nothing is evaluated on the text it was calibrated on:

* evaluation: the last 400,000 characters, or the second half of a text under 800,000
  characters; tokenized, the first ``n`` (default 16) windows of ``seq_len`` tokens;
* calibration: the first 1,000,000 characters of what comes before the evaluation part,
  tokenized, cut into non-overlapping windows of ``seq_len`` tokens, the first ``n``.

A text of 1,400,000 characters or more (the embedded ``wiki`` corpus) is read exactly as it
always was: the first 1,000,000 and the last 400,000 characters.  A shorter one is split at the
boundary above (logged), and one too short for the windows a part needs is refused, naming
``--text-file`` and the sizes.

Every window starts with the tokens the model's tokenizer puts at the start of a sequence (its
BOS token for Gemma 3, nothing for SmolLM2), followed by text tokens: models trained to see a
BOS first are far off without one (Gemma-3-270M: perplexity 68 instead of 18 on a 256-token
window of the corpus).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

CALIB_CHARS = 1_000_000
EVAL_CHARS = 400_000
SEQ_LEN = 512


@dataclass(frozen=True)
class WindowSpec:
    """Which slice of the corpus becomes which windows."""

    part: str  # "calib" (head of the text) or "eval" (tail of the text)
    n_windows: int
    seq_len: int = SEQ_LEN
    chars: int | None = None  # at most this many characters of the part (its head for calib, its tail for eval)

    def __post_init__(self) -> None:
        if self.part not in ("calib", "eval"):
            raise ValueError(f"part must be 'calib' or 'eval', got {self.part!r}")
        if self.n_windows <= 0:
            raise ValueError(f"n_windows must be positive, got {self.n_windows}")
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be at least 2, got {self.seq_len}")


def token_windows(tokenizer, text: str, spec: WindowSpec) -> torch.Tensor:
    """Cut ``text`` into token windows following ``spec``.

    Args:
        tokenizer: a Hugging Face tokenizer.
        text: the whole corpus.
        spec: which part and how many windows.
    Returns:
        int64 ``[n_windows, seq_len]`` token ids.
    Raises:
        ValueError: if the text is empty or too short for ``n_windows`` windows (the
            message says how many windows it does give).
    """
    if not text or not text.strip():
        raise ValueError("the text is empty: nothing to cut into windows")
    calib_part, eval_part = split_text(text)
    if spec.part == "calib":
        piece = calib_part[: spec.chars] if spec.chars else calib_part
    else:
        piece = eval_part[-spec.chars:] if spec.chars else eval_part
    ids = tokenizer(piece, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    prefix = sequence_prefix(tokenizer)
    body = spec.seq_len - len(prefix)
    if body < 1:
        raise ValueError(f"seq_len {spec.seq_len} leaves no room for text after the {len(prefix)} start token(s)")
    available = len(ids) // body
    if available < spec.n_windows:
        what = "calibration" if spec.part == "calib" else "evaluation"
        raise ValueError(
            f"the {what} part of the text ({len(piece):,} of its {len(text):,} characters, {len(ids):,} tokens) "
            f"gives only {available} windows of {spec.seq_len} tokens, {spec.n_windows} requested: calibration and "
            f"evaluation read disjoint parts of --text-file, so give a longer text (calibration reads up to "
            f"{CALIB_CHARS:,} characters, evaluation the last {EVAL_CHARS:,}) or fewer or shorter windows"
        )
    text_ids = torch.tensor(ids[: spec.n_windows * body], dtype=torch.long, device="cpu").view(spec.n_windows, body)
    start = torch.tensor(prefix, dtype=torch.long, device="cpu").expand(spec.n_windows, len(prefix))
    return torch.cat([start, text_ids], dim=1)


def split_text(text: str) -> tuple[str, str]:
    """The calibration and the evaluation part of ``text``: disjoint by construction.

    Evaluation takes the last ``EVAL_CHARS`` characters, or the second half of a text shorter
    than ``2 * EVAL_CHARS``; calibration the first ``CALIB_CHARS`` characters before that.  For a
    text of ``CALIB_CHARS + EVAL_CHARS`` characters or more this is the head and the tail the
    published numbers were measured on; a shorter text is split, and the split is logged.

    Returns:
        ``(calibration_part, evaluation_part)``.
    """
    eval_chars = min(EVAL_CHARS, len(text) // 2)
    boundary = len(text) - eval_chars
    if len(text) < CALIB_CHARS + EVAL_CHARS:
        _log_split(len(text), boundary)
    return text[: min(CALIB_CHARS, boundary)], text[boundary:]


_logged_splits: set[tuple[int, int]] = set()


def _log_split(length: int, boundary: int) -> None:
    """Say once per text length where a short text is split (every command cuts it several times)."""
    if (length, boundary) not in _logged_splits:
        _logged_splits.add((length, boundary))
        logger.warning("the text has %s characters (under %s): calibration reads characters 0-%s, evaluation %s-%s, "
                    "so they never overlap", f"{length:,}", f"{CALIB_CHARS + EVAL_CHARS:,}", f"{min(CALIB_CHARS, boundary):,}",
                    f"{boundary:,}", f"{length:,}")


def sequence_prefix(tokenizer) -> list[int]:
    """The special tokens ``tokenizer`` puts before the text of a sequence (e.g. ``[bos]``)."""
    probe = "The"
    with_special = tokenizer(probe)["input_ids"]
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    if not plain:
        return []
    for i in range(len(with_special) - len(plain) + 1):
        if with_special[i : i + len(plain)] == plain:
            return list(with_special[:i])
    return []


def calibration_windows(tokenizer, text: str, n: int = 64, seq_len: int = SEQ_LEN) -> torch.Tensor:
    """int64 ``[n, seq_len]`` calibration windows from the head of ``text``."""
    return token_windows(tokenizer, text, WindowSpec("calib", n, seq_len))


def evaluation_windows(tokenizer, text: str, n: int = 16, seq_len: int = SEQ_LEN) -> torch.Tensor:
    """int64 ``[n, seq_len]`` evaluation windows from the tail of ``text``."""
    return token_windows(tokenizer, text, WindowSpec("eval", n, seq_len))


def check_fits_context(model, tokens: int, what: str = "windows") -> None:
    """Refuse windows longer than the model's context (``max_position_embeddings``): positions
    past it were never trained, so a perplexity or a Hessian measured there means nothing.

    Raises:
        ValueError: naming the length, the context and ``--seq-len``.
    """
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(context, int) and tokens > context:
        raise ValueError(f"{what} of {tokens} tokens are longer than the model's context of {context} tokens "
                         f"(max_position_embeddings): use --seq-len {context} or less")


def check_token_ids(model, ids, what: str = "windows") -> None:
    """Refuse token ids outside the model's vocabulary (its input embedding's rows), naming the
    first such id and the vocabulary size: the embedding lookup would fail with a bare
    ``IndexError`` (or read another device's memory on a GPU).

    Args:
        model: a causal LM with ``get_input_embeddings()``; others are not checked.
        ids: an int64 tensor of any shape, or a list of them.
        what: what the ids are, for the message ("calibration windows", "examples").
    Raises:
        ValueError: an id below 0 or at least the vocabulary size.
    """
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(embeddings, "num_embeddings", None)
    if not isinstance(vocab, int):
        return
    for i, tensor in enumerate(ids if isinstance(ids, (list, tuple)) else [ids]):
        bad = (tensor < 0) | (tensor >= vocab)
        if bool(bad.any()):
            where = bad.nonzero()[0].tolist()
            index = [i, *where] if isinstance(ids, (list, tuple)) else where
            raise ValueError(f"{what} hold token id {int(tensor[tuple(where)])} (at {tuple(index)}), outside the model's "
                             f"vocabulary of {vocab} ids (0-{vocab - 1}): were they made with this model's tokenizer?")
