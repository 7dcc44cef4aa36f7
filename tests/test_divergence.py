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
from bitcliff.divergence import (
    bucketed_divergence,
    evaluate_against,
    evaluate_with_reference,
    reference_predictions,
    summarize,
    token_divergence,
)
from bitcliff.eval import evaluate_ppl
from bitcliff.kernels.cpu import exact_activations


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
    # fp32 activations: the two batch the windows differently, and the kernel's 15-bit rounding of
    # activations turns the batch's last-bit differences upstream into flipped roundings (1e-4 of
    # this KL); the metric, not the kernel, is under test
    with exact_activations():
        result = evaluate_against(quantized, tiny_llama, ids, batch_size=2, progress=False)
        with torch.no_grad():
            brute_kl, brute_top = _brute_force_kl(tiny_llama(input_ids=ids).logits, quantized(input_ids=ids).logits)
        ppl = evaluate_ppl(quantized, ids, progress=False)["ppl"]
    assert result["kl_mean"] == pytest.approx(float(brute_kl.mean()), rel=1e-4)
    assert result["kl_max"] == pytest.approx(float(brute_kl.max()), rel=1e-4)
    assert result["same_top_pct"] == pytest.approx(100 * float(brute_top.double().mean()))
    assert result["ppl"] == pytest.approx(ppl, rel=1e-6)
    assert result["ppl_fp"] == pytest.approx(evaluate_ppl(tiny_llama, ids, progress=False)["ppl"], rel=1e-6)
    assert len(result["kl_per_window"]) == 3 and result["tokens"] == 3 * 11
    json.dumps(result)  # JSON-ready
    itself = evaluate_against(tiny_llama, tiny_llama, ids, progress=False)
    assert itself["kl_max"] == 0.0 and itself["same_top_pct"] == 100.0


def test_bucketed_divergence_is_exact_with_every_token_kept_and_a_lower_bound_with_fewer():
    gen = torch.Generator().manual_seed(3)
    fp = torch.randn(2, 7, 13, generator=gen) * 3
    q = fp + torch.randn(2, 7, 13, generator=gen)
    exact, exact_top = token_divergence(fp, q)
    log_probs = torch.log_softmax(fp[:, :-1].float(), dim=-1)
    for k in (13, 5, 1):
        top = log_probs.topk(k, dim=-1)
        rest = log_probs.scatter(-1, top.indices, float("-inf")).logsumexp(dim=-1)  # every other token
        kl, same_top = bucketed_divergence(top.values, top.indices.to(torch.int32), rest, q)
        assert torch.equal(same_top, exact_top)  # the top token needs only the first kept one
        if k == 13:
            torch.testing.assert_close(kl, exact, rtol=1e-5, atol=1e-6)
        else:
            assert bool((kl <= exact + 1e-6).all()) and float(kl.sum()) < float(exact.sum())
    with pytest.raises(ValueError, match="cover different positions"):
        bucketed_divergence(top.values, top.indices, rest, q[:, :5])


def test_evaluating_against_kept_predictions_gives_the_perplexity_and_the_divergence(tiny_llama):
    quantized = bitcliff.quantize(copy.deepcopy(tiny_llama), QuantConfig(bits=2, group_size=32), progress=False)
    ids = torch.randint(0, 128, (3, 12), generator=torch.Generator().manual_seed(2))
    direct = evaluate_against(quantized, tiny_llama, ids, progress=False)
    every = evaluate_with_reference(quantized, reference_predictions(tiny_llama, ids, top_k=128, progress=False),
                                    progress=False)
    assert every["ppl"] == evaluate_ppl(quantized, ids, progress=False)["ppl"]  # to the last digit
    for key in ("kl_mean", "kl_median", "kl_p99", "kl_max", "same_top_pct", "ppl_fp"):
        assert every[key] == pytest.approx(direct[key], rel=1e-5, abs=1e-7), key
    few = evaluate_with_reference(quantized, reference_predictions(tiny_llama, ids, top_k=8, progress=False),
                                  batch_size=2, progress=False)
    assert few["same_top_pct"] == direct["same_top_pct"] and 0 < few["kl_mean"] <= direct["kl_mean"]
    with pytest.raises(ValueError, match="top_k must be at least 1"):
        reference_predictions(tiny_llama, ids, top_k=0)


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
                     "--seq-len", "64", "--json", str(report), "--reference-cache", str(tmp_path / "fp")]) == 0
    out = capsys.readouterr().out
    assert "KL mean" in out and "same top token" in out
    result = json.loads(report.read_text())
    assert result["kl_mean"] >= 0 and 0 <= result["same_top_pct"] <= 100 and len(result["kl_per_window"]) == 2
    assert cli_main(["eval", str(checkpoint), "--against", str(tmp_path / "nothing"), "--text-file", text]) == 2
    assert "--against" in capsys.readouterr().err


def test_repair_on_the_command_line_reports_the_divergence_before_and_after(tiny_folder, tmp_path, capsys):
    text = str(tiny_folder.parent / "text.txt")
    quantized, repaired = tmp_path / "q", tmp_path / "r"
    assert cli_main(["quantize", "--model", str(tiny_folder), "--method", "rtn", "--bits", "2", "--group-size", "32",
                     "--out", str(quantized)]) == 0
    assert cli_main(["repair", "--model", str(tiny_folder), "--quantized", str(quantized), "--budget", "0.5",
                     "--methods", "lowrank", "--rank", "2", "--text-file", text, "--calib-samples", "4",
                     "--seq-len", "32", "--windows", "2", "--out", str(repaired)]) == 0
    out = capsys.readouterr().out
    assert "KL divergence from fp (nats per token): quantized " in out and "same top token" in out
    record = json.loads((repaired / "repair.json").read_text())
    before, after = record["divergence"]["quantized"], record["divergence"]["repaired"]
    assert before["kl_mean"] > 0 and after["kl_mean"] >= 0
    assert f"quantized {before['kl_mean']:.4f}, repaired {after['kl_mean']:.4f}" in out
