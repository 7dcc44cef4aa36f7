"""Token windows for calibration and evaluation (the DESIGN §5 protocol).

Calibration: the first 1,000,000 characters of the corpus, tokenized, cut into
non-overlapping windows of ``seq_len`` tokens, the first ``n``.
Evaluation: the last 400,000 characters, tokenized, the first ``n`` (default 16) windows.
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
    available = len(ids) // spec.seq_len
    if available < spec.n_windows:
        raise ValueError(
            f"the {spec.part} text ({len(piece):,} characters, {len(ids):,} tokens) gives only "
            f"{available} windows of {spec.seq_len} tokens, {spec.n_windows} requested"
        )
    usable = torch.tensor(ids[: spec.n_windows * spec.seq_len], dtype=torch.long)
    return usable.view(spec.n_windows, spec.seq_len)


def calibration_windows(tokenizer, text: str, n: int = 64, seq_len: int = SEQ_LEN) -> torch.Tensor:
    """int64 ``[n, seq_len]`` calibration windows from the head of ``text``."""
    return token_windows(tokenizer, text, WindowSpec("calib", n, seq_len))


def evaluation_windows(tokenizer, text: str, n: int = 16, seq_len: int = SEQ_LEN) -> torch.Tensor:
    """int64 ``[n, seq_len]`` evaluation windows from the tail of ``text``."""
    return token_windows(tokenizer, text, WindowSpec("eval", n, seq_len))
