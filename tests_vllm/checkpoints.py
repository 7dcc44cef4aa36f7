"""Small bitcliff checkpoints of the embedded SmolLM2-135M, and greedy continuations through bitcliff.load."""

from __future__ import annotations

from pathlib import Path

import torch

PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
)
NEW_TOKENS = 32


def make_checkpoint(folder: Path, **settings) -> Path:
    """Quantize the embedded model with ``QuantConfig(**settings)`` (GPTQ calibrated on the head of
    the embedded wiki text) and save it to ``folder``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import bitcliff
    from bitcliff.assets import resolve_model
    from bitcliff.quant.convert import quantize_on_text

    source = resolve_model("default")
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(source)
    quantize_on_text(model, tokenizer, bitcliff.QuantConfig(**settings), "wiki", seq_len=128)
    return bitcliff.save(model, folder, tokenizer)


def prompt_ids(folder: Path) -> list[list[int]]:
    """The prompts as token ids, tokenized once so that both paths see the same input."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    return [tokenizer(p)["input_ids"] for p in PROMPTS]


@torch.no_grad()
def bitcliff_greedy(folder: Path, prompts: list[list[int]], new_tokens: int = NEW_TOKENS):
    """Greedy continuations by ``bitcliff.load`` in fp32, never stopping at EOS.

    Returns:
        ``(tokens, margins)``: per prompt the ``new_tokens`` chosen ids, and at each step the gap
        between the top two logits (how close the choice was to a tie).
    """
    import bitcliff

    # vLLM computes the unembedding in fp32: so does the reference (not its bf16 decode copy)
    model = bitcliff.load(folder, dtype=torch.float32, bf16_unembedding=False)
    all_tokens, all_margins = [], []
    for ids in prompts:
        x = torch.tensor([ids])
        out = model(x, use_cache=True)
        tokens, margins = [], []
        for _ in range(new_tokens):
            logits = out.logits[0, -1].float()
            top = torch.topk(logits, 2).values
            margins.append(float(top[0] - top[1]))
            nxt = int(logits.argmax())
            tokens.append(nxt)
            out = model(torch.tensor([[nxt]]), past_key_values=out.past_key_values, use_cache=True)
        all_tokens.append(tokens)
        all_margins.append(margins)
    return all_tokens, all_margins
