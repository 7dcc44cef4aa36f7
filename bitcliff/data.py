"""Token windows for calibration and evaluation (the evaluation protocol of docs/architecture.md).

Calibration: the first 1,000,000 characters of the corpus, tokenized, cut into
non-overlapping windows of ``seq_len`` tokens, the first ``n``.
Evaluation: the last 400,000 characters, tokenized, the first ``n`` (default 16) windows.

Every window starts with the tokens the model's tokenizer puts at the start of a sequence (its
BOS token for Gemma 3, nothing for SmolLM2), followed by text tokens: models trained to see a
BOS first are far off without one (Gemma-3-270M: perplexity 68 instead of 18 on a 256-token
window of the corpus).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

CALIB_CHARS = 1_000_000
EVAL_CHARS = 400_000
SEQ_LEN = 512


@dataclass(frozen=True)
class WindowSpec:
    """Which slice of the corpus becomes which windows."""

    part: str  # "calib" (head of the text) or "eval" (tail of the text)
    n_windows: int
    seq_len: int = SEQ_LEN
    chars: int | None = None  # defaults per part: CALIB_CHARS / EVAL_CHARS

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
    chars = spec.chars or (CALIB_CHARS if spec.part == "calib" else EVAL_CHARS)
    piece = text[:chars] if spec.part == "calib" else text[-chars:]
    ids = tokenizer(piece, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    prefix = sequence_prefix(tokenizer)
    body = spec.seq_len - len(prefix)
    if body < 1:
        raise ValueError(f"seq_len {spec.seq_len} leaves no room for text after the {len(prefix)} start token(s)")
    available = len(ids) // body
    if available < spec.n_windows:
        raise ValueError(
            f"the {spec.part} text ({len(piece):,} characters, {len(ids):,} tokens) gives only "
            f"{available} windows of {spec.seq_len} tokens, {spec.n_windows} requested"
        )
    text_ids = torch.tensor(ids[: spec.n_windows * body], dtype=torch.long, device="cpu").view(spec.n_windows, body)
    start = torch.tensor(prefix, dtype=torch.long, device="cpu").expand(spec.n_windows, len(prefix))
    return torch.cat([start, text_ids], dim=1)


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
