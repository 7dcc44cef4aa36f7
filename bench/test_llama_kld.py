"""The llama.cpp KL cross-check reads the tokens llama-perplexity evaluated from its base file."""

from __future__ import annotations

import numpy as np
import pytest

from bench.llama_kld_check import read_base_tokens


def test_reads_the_tokens_after_the_header(tmp_path):
    tokens = np.arange(2 * 6, dtype=np.int32).reshape(2, 6)
    path = tmp_path / "base.kld"
    header = np.array([6, 50, 2], dtype=np.int32).tobytes()  # n_ctx, n_vocab, n_chunk
    path.write_bytes(b"_logits_" + header + tokens.tobytes() + b"\x00" * 40)  # log-probabilities follow
    n_ctx, n_chunk, read = read_base_tokens(path)
    assert (n_ctx, n_chunk) == (6, 2) and np.array_equal(read, tokens)


def test_refuses_a_file_that_is_not_a_base_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("not logits")
    with pytest.raises(ValueError, match="not a llama-perplexity log-probability file"):
        read_base_tokens(path)
