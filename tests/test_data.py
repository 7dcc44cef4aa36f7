"""Token windows: sizes, the start-of-sequence prefix, refusals."""

from __future__ import annotations

import pytest
import torch

from bitcliff.data import calibration_windows, evaluation_windows, sequence_prefix


class WordTokenizer:
    """Whitespace tokenizer: word -> its length, with an optional BOS id 99 (like Gemma's)."""

    def __init__(self, bos: bool) -> None:
        self.bos = bos

    def __call__(self, text, add_special_tokens=True, return_attention_mask=True):
        ids = [len(word) for word in text.split()]
        return {"input_ids": ([99] if self.bos and add_special_tokens else []) + ids}


TEXT = " ".join(["a", "bb", "ccc"] * 200)


def test_prefix_detection():
    assert sequence_prefix(WordTokenizer(bos=True)) == [99]
    assert sequence_prefix(WordTokenizer(bos=False)) == []


def test_windows_without_prefix_are_plain_text():
    w = calibration_windows(WordTokenizer(bos=False), TEXT, n=3, seq_len=6)
    assert w.shape == (3, 6) and w.dtype == torch.int64
    assert w[0].tolist() == [1, 2, 3, 1, 2, 3] and w[1].tolist() == [1, 2, 3, 1, 2, 3]


def test_every_window_starts_with_the_bos_token():
    w = evaluation_windows(WordTokenizer(bos=True), TEXT, n=4, seq_len=5)
    assert w.shape == (4, 5)
    assert w[:, 0].tolist() == [99] * 4
    # the text continues across windows without gaps: 4 text tokens per window
    flat = w[:, 1:].flatten().tolist()
    assert flat == [[1, 2, 3][i % 3] for i in range(16)]


def test_too_little_text_says_how_many_windows_it_gives():
    with pytest.raises(ValueError, match="gives only 1 windows"):
        calibration_windows(WordTokenizer(bos=True), "a b c d e", n=2, seq_len=6)


def test_calibration_text_too_short_or_empty():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    words.pre_tokenizer = Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words)
    with pytest.raises(ValueError, match="gives only 0 windows of 512 tokens, 1 requested"):
        calibration_windows(tokenizer, "a b a b", n=1, seq_len=512)
    with pytest.raises(ValueError, match="gives only 2 windows"):
        calibration_windows(tokenizer, "a b " * 600, n=64, seq_len=512)
    with pytest.raises(ValueError, match="empty"):
        calibration_windows(tokenizer, "   ", n=1)
