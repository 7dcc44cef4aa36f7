"""The NLL definition and the perplexity of a window set."""

from __future__ import annotations

import math

import pytest
import torch

from bitcliff.eval import evaluate_ppl, next_token_nll


def test_next_token_nll_is_minus_the_log_probability_of_each_next_token():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 7, 11, generator=gen, dtype=torch.float64).to(torch.bfloat16)  # leading dims [2, 3]
    ids = torch.randint(0, 11, (2, 3, 7), generator=gen)
    nll = next_token_nll(logits, ids)
    assert nll.shape == (2, 3, 6) and nll.dtype == torch.float32
    expected = -torch.log_softmax(logits.float(), dim=-1)[..., :-1, :].gather(-1, ids[..., 1:, None])[..., 0]
    torch.testing.assert_close(nll, expected, rtol=1e-6, atol=1e-6)


def test_perplexity_is_exp_of_the_mean_token_nll(tiny_llama):
    ids = torch.randint(0, 128, (3, 16), generator=torch.Generator().manual_seed(1))
    result = evaluate_ppl(tiny_llama, ids, batch_size=2, progress=False)
    with torch.no_grad():
        nll = next_token_nll(tiny_llama(input_ids=ids).logits, ids)
    assert result["tokens"] == 45 and result["windows"] == 3
    assert result["ppl"] == pytest.approx(math.exp(float(nll.double().mean())), rel=1e-6)


def test_too_short_windows_are_refused(tiny_llama):
    with pytest.raises(ValueError, match="T >= 2"):
        evaluate_ppl(tiny_llama, torch.zeros(2, 1, dtype=torch.long), progress=False)


def test_a_model_that_computes_nan_has_no_perplexity(tiny_llama):
    with torch.no_grad():
        tiny_llama.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    ids = torch.randint(0, 128, (3, 16), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="NLL is NaN or infinite on 3 of 3 windows"):
        evaluate_ppl(tiny_llama, ids, progress=False)
