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
    # 20 characters: calibration reads the first 10 ("a b c d e "), 5 tokens, one window of 1 + 4
    with pytest.raises(ValueError, match="gives only 1 windows"):
        calibration_windows(WordTokenizer(bos=True), "a b c d e f g h i j ", n=2, seq_len=5)


class CountingTokenizer:
    """``w<i>`` -> ``i``: every word of a text of distinct words is its own id, so windows show where they come from."""

    def __call__(self, text, add_special_tokens=True, return_attention_mask=True):
        return {"input_ids": [int(word[1:]) for word in text.split() if word[1:].isdigit()]}


def test_calibration_and_evaluation_of_a_short_text_are_disjoint():
    # 200 k characters: before, calibration read all of it and evaluation the whole text too
    text = " ".join(f"w{i:06d}" for i in range(25_000))
    assert len(text) < 400_000
    calib = calibration_windows(CountingTokenizer(), text, n=20, seq_len=512)
    evals = evaluation_windows(CountingTokenizer(), text, n=20, seq_len=512)
    assert not set(calib.flatten().tolist()) & set(evals.flatten().tolist())
    assert calib.max() < 12_500 <= evals.min()  # the first half, then the second


def test_a_text_too_short_for_both_parts_is_refused_naming_the_flag_and_sizes():
    text = " ".join(f"w{i:06d}" for i in range(25_000))  # 12,500 words in each half
    with pytest.raises(ValueError, match=r"calibration part of the text \(100,000 of its 199,999 characters, "
                                         r"12,500 tokens\) gives only 24 windows of 512 tokens, 64 requested.*--text-file"):
        calibration_windows(CountingTokenizer(), text, n=64, seq_len=512)
    with pytest.raises(ValueError, match="evaluation part.*--text-file"):
        evaluation_windows(CountingTokenizer(), text, n=64, seq_len=512)


def test_a_long_text_keeps_the_head_and_the_tail():
    text = " ".join(f"w{i:07d}" for i in range(200_000))  # 1.8 M characters
    calib = calibration_windows(CountingTokenizer(), text, n=2, seq_len=4)
    evals = evaluation_windows(CountingTokenizer(), text, n=1, seq_len=4)
    assert calib.flatten().tolist() == list(range(8))
    assert evals[0].tolist() == [int(w[1:]) for w in text[-400_000:].split()[:4]]


@pytest.mark.slow
def test_the_embedded_corpus_gives_the_published_windows():
    """The windows every published number was measured on, pinned by their digest: the split of
    short texts must leave the embedded corpus (2.8 M characters) exactly as it was."""
    import hashlib

    from transformers import AutoTokenizer

    from bitcliff.assets import load_text, resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("default"))
    text = load_text("wiki")
    digests = {
        "calib": calibration_windows(tokenizer, text, 128, 512),
        "eval": evaluation_windows(tokenizer, text, 16, 512),
        "eval256": evaluation_windows(tokenizer, text, 16, 256),
    }
    digests = {name: hashlib.sha256(w.numpy().tobytes()).hexdigest() for name, w in digests.items()}
    assert digests == {
        "calib": "21bda311b1982cd2133fcfc9ef37f975ce1e7ab7ed13eaf416fc4bbd29793c0f",
        "eval": "b55773408224d028f61d98319b0a0d25c92dbfb3b0794542952d7fde894bd9ff",
        "eval256": "099168d9ce4d52a20e6340618ae6af74b81c06dc5912fb4ca66a5c6436ff6578",
    }


def test_the_embedded_books_give_the_windows_of_the_head_and_the_tail():
    """``canterbury`` (about 1.1 M characters) is split: its windows stay those of the first
    1,000,000 and the last 400,000 characters, because they end long before the split."""
    from bitcliff.assets.texts import _canterbury_path

    if not _canterbury_path().is_file():
        pytest.skip("the embedded Canterbury text is not prepared (bitcliff assets canterbury)")
    from transformers import AutoTokenizer

    from bitcliff.assets import load_text, resolve_model
    from bitcliff.data import SEQ_LEN, sequence_prefix

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("default"))
    text = load_text("canterbury")
    body = SEQ_LEN - len(sequence_prefix(tokenizer))
    for part, windows, n in (("calib", calibration_windows, 128), ("eval", evaluation_windows, 16)):
        old = text[:1_000_000] if part == "calib" else text[-400_000:]
        ids = tokenizer(old, add_special_tokens=False)["input_ids"][: n * body]
        assert windows(tokenizer, text, n, SEQ_LEN)[:, -body:].flatten().tolist() == ids


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
        calibration_windows(tokenizer, "a b " * 1200, n=64, seq_len=512)  # calibration reads the first half
    with pytest.raises(ValueError, match="empty"):
        calibration_windows(tokenizer, "   ", n=1)
