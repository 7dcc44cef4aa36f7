"""KL divergence and same-top agreement against the full-precision model: llama.cpp's definitions,
checked against a brute-force computation, on the perplexity's windows."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

import bitcliff
from bitcliff import QuantConfig
from bitcliff.cli import main as cli_main
from bitcliff.divergence import evaluate_against, summarize, token_divergence
from bitcliff.eval import evaluate_ppl


def _brute_force_kl(fp_logits, q_logits):
    """KL(P_fp || P_q) and same top token at every predicting position, one position at a time, fp64."""
    kls, tops = [], []
    for w in range(fp_logits.shape[0]):
        for t in range(fp_logits.shape[1] - 1):
            p = torch.softmax(fp_logits[w, t].double(), dim=0)
            q = torch.softmax(q_logits[w, t].double(), dim=0)
            kls.append(float(sum(p[v] * math.log(p[v] / q[v]) for v in range(len(p)))))
            tops.append(int(p.argmax()) == int(q.argmax()))
    return torch.tensor(kls, dtype=torch.float64), torch.tensor(tops)


def test_token_divergence_is_the_definition():
    gen = torch.Generator().manual_seed(0)
    fp = torch.randn(2, 6, 11, generator=gen) * 3
    q = fp + torch.randn(2, 6, 11, generator=gen)
    kl, same_top = token_divergence(fp, q)
    assert kl.shape == same_top.shape == (2, 5)
    brute_kl, brute_top = _brute_force_kl(fp, q)
    torch.testing.assert_close(kl.flatten().double(), brute_kl, rtol=1e-5, atol=1e-7)
    assert torch.equal(same_top.flatten(), brute_top)
    zero, agree = token_divergence(fp, fp.clone())
    assert float(zero.max()) == 0.0 and bool(agree.all())
    with pytest.raises(ValueError, match="logits of different shapes"):
        token_divergence(fp, q[:, :5])


def test_summary_statistics_are_over_tokens_with_an_interval_over_windows():
    kl = torch.tensor([[0.0, 0.1, 0.2, 0.3], [0.4, 0.5, 0.6, 3.0]])
    same = torch.tensor([[True, True, False, True], [True, False, False, False]])
    nll_fp = torch.full((2, 4), 1.0)
    nll_q = torch.tensor([[1.0, 1.2, 1.4, 1.0], [2.0, 2.0, 2.0, 2.0]])
    s = summarize(kl, same, nll_fp, nll_q)
    assert s["kl_mean"] == pytest.approx(5.1 / 8) and s["kl_max"] == pytest.approx(3.0)
    assert s["kl_median"] == pytest.approx(0.35) and s["same_top_pct"] == pytest.approx(50.0)
    windows = torch.tensor([0.15, 1.125], dtype=torch.float64)
    half = 1.959964 * float(windows.std()) / math.sqrt(2)
    assert s["kl_mean_ci95"] == pytest.approx([5.1 / 8 - half, 5.1 / 8 + half])
    assert s["log_ppl_diff_per_window"] == pytest.approx([0.15, 1.0])
    assert s["ppl_fp"] == pytest.approx(math.e) and s["ppl"] == pytest.approx(math.exp((1.15 + 2.0) / 2))
    assert s["delta_ppl"] == pytest.approx(s["ppl"] - s["ppl_fp"]) and s["tokens"] == 8 and s["windows"] == 2
    assert summarize(kl[:1], same[:1], nll_fp[:1], nll_q[:1])["kl_mean_ci95"] is None


def test_evaluate_against_matches_brute_force_and_the_perplexity(tiny_llama):
    quantized = bitcliff.quantize(copy.deepcopy(tiny_llama), QuantConfig(bits=2, group_size=32), progress=False)
    ids = torch.randint(0, 128, (3, 12), generator=torch.Generator().manual_seed(2))
    result = evaluate_against(quantized, tiny_llama, ids, batch_size=2, progress=False)
    with torch.no_grad():
        brute_kl, brute_top = _brute_force_kl(tiny_llama(input_ids=ids).logits, quantized(input_ids=ids).logits)
    assert result["kl_mean"] == pytest.approx(float(brute_kl.mean()), rel=1e-4)
    assert result["kl_max"] == pytest.approx(float(brute_kl.max()), rel=1e-4)
    assert result["same_top_pct"] == pytest.approx(100 * float(brute_top.double().mean()))
    assert result["ppl"] == pytest.approx(evaluate_ppl(quantized, ids, progress=False)["ppl"], rel=1e-6)
    assert result["ppl_fp"] == pytest.approx(evaluate_ppl(tiny_llama, ids, progress=False)["ppl"], rel=1e-6)
    assert len(result["kl_per_window"]) == 3 and result["tokens"] == 3 * 11
    json.dumps(result)  # JSON-ready
    itself = evaluate_against(tiny_llama, tiny_llama, ids, progress=False)
    assert itself["kl_max"] == 0.0 and itself["same_top_pct"] == 100.0


def test_another_model_or_windows_beyond_the_context_are_refused(tiny_llama):
    from transformers import LlamaForCausalLM

    from tests.conftest import tiny_llama_config

    torch.manual_seed(5)
    other = LlamaForCausalLM(tiny_llama_config()).eval()
    ids = torch.randint(0, 128, (1, 12))
    with pytest.raises(ValueError, match="--against: the reference model is not the source"):
        evaluate_against(tiny_llama, other, ids, progress=False)
    with pytest.raises(ValueError, match="longer than the model's context of 64 tokens.*--seq-len"):
        evaluate_against(tiny_llama, tiny_llama, torch.zeros(1, 65, dtype=torch.long), progress=False)


def test_eval_against_on_the_command_line(tiny_folder, tmp_path, capsys):
    text = str(tiny_folder.parent / "text.txt")
    checkpoint = tmp_path / "w3"
    assert cli_main(["quantize", "--model", str(tiny_folder), "--bits", "3", "--group-size", "32",
                     "--out", str(checkpoint)]) == 0
    report = tmp_path / "eval.json"
    assert cli_main(["eval", str(checkpoint), "--against", str(tiny_folder), "--text-file", text, "--windows", "2",
                     "--seq-len", "64", "--json", str(report)]) == 0
    out = capsys.readouterr().out
    assert "KL mean" in out and "same top token" in out
    result = json.loads(report.read_text())
    assert result["kl_mean"] >= 0 and 0 <= result["same_top_pct"] <= 100 and len(result["kl_per_window"]) == 2
    assert cli_main(["eval", str(checkpoint), "--against", str(tmp_path / "nothing"), "--text-file", text]) == 2
    assert "--against" in capsys.readouterr().err
