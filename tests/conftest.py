"""Shared fixtures: tiny random models for fast tests, the embedded model for real ones."""

from __future__ import annotations

from bitcliff import numerics

# The commands' CPU paths, before any test computes: the tests compare bytes that the commands
# pin (importing bitcliff leaves the process alone, so the suite pins for itself).
numerics.pin()

import zlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_from_the_test_name(request):
    """Each test draws the same random inputs on every run and machine, whatever ran before it: a
    tolerance that one draw in six breaks fails here, not once in a while on CI."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    values = dict(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    values.update(overrides)
    return LlamaConfig(**values)


@pytest.fixture
def tiny_llama():
    """A random 2-layer Llama (hidden 64) in eval mode, seeded."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config()).eval()


def word_tokenizer(vocab_size: int = 128):
    """A whitespace word-level tokenizer over ``w0 .. w{n-3}`` plus [UNK] and [EOS]: tiny, offline."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(vocab_size - 2)} | {"[UNK]": vocab_size - 2, "[EOS]": vocab_size - 1}
    words = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    words.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]", eos_token="[EOS]")


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """A saved random 2-layer Llama with a word-level tokenizer, and a text file in its vocabulary
    (``<folder>/../text.txt``): what the command line needs, without the embedded model."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("tiny")
    folder = root / "model"
    LlamaForCausalLM(tiny_llama_config(max_position_embeddings=512)).save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    gen = torch.Generator().manual_seed(1)
    words = [f"w{int(i)}" for i in torch.randint(0, 126, (60000,), generator=gen)]
    (root / "text.txt").write_text(" ".join(words))
    return folder


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` run wherever CUDA exists and are skipped, with the reason, elsewhere."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (bench/gpu_check.sh runs the cuda tests on one)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
