"""Small bitcliff checkpoints of the embedded SmolLM2-135M, and greedy continuations through bitcliff.load."""

from __future__ import annotations

import copy
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


def make_repaired_checkpoint(folder: Path, methods: list[str], budget: float = 0.5, factor_bits: int | None = None,
                             **settings) -> Path:
    """Quantize the embedded model with ``QuantConfig(**settings)``, repair it with ``methods`` at
    ``budget`` extra bits per weight (a fast diagnosis, 8 windows of 128 tokens of wiki; low-rank
    factors at ``factor_bits``, None for the default), and save it with its side files to ``folder``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import bitcliff
    from bitcliff.assets import load_text, resolve_model
    from bitcliff.data import calibration_windows
    from bitcliff.diagnosis.run import DiagnoseOptions

    source = resolve_model("default")
    fp = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(source)
    q = bitcliff.quantize(copy.deepcopy(fp), bitcliff.QuantConfig(**settings), progress=False)
    calib = calibration_windows(tokenizer, load_text("wiki"), 8, 128)
    report = bitcliff.diagnose(fp, q, calib[:4], options=DiagnoseOptions.fast(), progress=False)
    plan = bitcliff.plan_repair(report, budget, methods=methods,
                                **({} if factor_bits is None else {"factor_bits": factor_bits}))
    result = bitcliff.repair(fp, q, calib, plan, progress=False)
    return bitcliff.save(q, folder, tokenizer, extra_files=result.files())


def prompt_ids(folder: Path) -> list[list[int]]:
    """The prompts as token ids, tokenized once so that both paths see the same input."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    return [tokenizer(p)["input_ids"] for p in PROMPTS]


def bitcliff_greedy(folder: Path, prompts: list[list[int]], new_tokens: int = NEW_TOKENS):
    """Greedy continuations by ``bitcliff.load`` in fp32, never stopping at EOS.

    Returns:
        ``(tokens, margins, shifts)``: per prompt the ``new_tokens`` chosen ids; at each step the
        gap between the top two logits (how close the choice was to a tie); and how far the
        kernel's integer decode (activations rounded to 15 bits) has moved that step's logits from
        the same tokens run in fp32 all along, prefill included (the largest change of one
        logit).  That drift builds up through the KV cache, and fastest in a collapsed model.  Two engines whose
        activations differ in their last bits round some of them to neighbouring integers at every
        step, so a divergence where the gap is within that reach is not an error.
    """
    import bitcliff

    # vLLM computes the unembedding in fp32: so does the reference (not its bf16 decode copy)
    model = bitcliff.load(folder, dtype=torch.float32, bf16_unembedding=False)
    all_tokens, all_margins, all_shifts = [], [], []
    for ids in prompts:
        with torch.no_grad():  # the cache is copied for each fp32 step: its tensors must be graph leaves
            tokens, margins, shifts = _greedy_one(model, ids, new_tokens)
        all_tokens.append(tokens)
        all_margins.append(margins)
        all_shifts.append(shifts)
    return all_tokens, all_margins, all_shifts


def _greedy_one(model, ids: list[int], new_tokens: int):
    """One prompt's ``(tokens, margins, shifts)`` (see :func:`bitcliff_greedy`): the kernel's
    integer products choose the tokens (decode, and prefill in an AVX-512 build), and a second KV
    cache follows the same tokens in fp32."""
    from bitcliff.kernels.cpu import exact_activations

    x = torch.tensor([ids])
    out = model(x, use_cache=True)
    with exact_activations():
        exact = model(x, use_cache=True)
    exact_cache = exact.past_key_values
    tokens, margins = [], []
    shifts = [float((out.logits[0, -1].float() - exact.logits[0, -1].float()).abs().max())]
    for step in range(new_tokens):
        logits = out.logits[0, -1].float()
        top = torch.topk(logits, 2).values
        margins.append(float(top[0] - top[1]))
        nxt = int(logits.argmax())
        tokens.append(nxt)
        if step + 1 == new_tokens:
            break
        out = model(torch.tensor([[nxt]]), past_key_values=out.past_key_values, use_cache=True)
        with exact_activations():
            exact = model(torch.tensor([[nxt]]), past_key_values=exact_cache, use_cache=True)
        exact_cache = exact.past_key_values
        shifts.append(float((out.logits[0, -1].float() - exact.logits[0, -1].float()).abs().max()))
    return tokens, margins, shifts
