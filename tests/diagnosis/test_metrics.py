"""The elementary measures against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from bitcliff.diagnosis import metrics


def test_relative_error_and_cosine():
    ref = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    x = torch.tensor([[3.0, 4.0], [0.0, 1.0]])
    assert metrics.relative_error(x, ref).tolist() == pytest.approx([0.0, math.sqrt(2)])
    assert metrics.cosine(x, ref).tolist() == pytest.approx([1.0, 0.0])
    assert metrics.squared_error_and_norm(x, ref) == pytest.approx((2.0, 26.0))


def test_kl_and_rank():
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    assert metrics.kl_divergence(logits, logits).item() == pytest.approx(0.0, abs=1e-12)
    p = torch.softmax(logits.double(), -1)
    q_logits = torch.tensor([[0.0, 1.0, 2.0]])
    q = torch.softmax(q_logits.double(), -1)
    assert metrics.kl_divergence(logits, q_logits).item() == pytest.approx(float((p * (p / q).log()).sum()))
    assert metrics.rank_of(q_logits, torch.tensor([0])).tolist() == [2]
    assert metrics.rank_of(q_logits, torch.tensor([2])).tolist() == [0]


def test_js_divergence_bounds():
    p = torch.tensor([[0.5, 0.5, 0.0, 0.0]])
    q = torch.tensor([[0.0, 0.0, 0.5, 0.5]])
    assert metrics.js_divergence(p, p).item() == pytest.approx(0.0, abs=1e-12)
    assert metrics.js_divergence(p, q).item() == pytest.approx(1.0)
    mid = metrics.js_divergence(p, torch.tensor([[0.5, 0.0, 0.5, 0.0]])).item()
    assert 0.0 < mid < 1.0


def test_spearman_pearson():
    x = [1.0, 2.0, 3.0, 4.0, 5.0]
    assert metrics.spearman(x, [v**3 for v in x]) == pytest.approx(1.0)
    assert metrics.spearman(x, [-v for v in x]) == pytest.approx(-1.0)
    assert metrics.pearson(x, [2 * v + 1 for v in x]) == pytest.approx(1.0)
    assert math.isnan(metrics.pearson(x, [1.0] * 5))
    # ties share their mean rank
    assert metrics.spearman([1, 1, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486832980505138)
    with pytest.raises(ValueError, match="one length"):
        metrics.spearman([1, 2, 3], [1, 2])


def test_auroc():
    assert metrics.auroc([0.1, 0.2, 0.8, 0.9], [False, False, True, True]) == 1.0
    assert metrics.auroc([0.9, 0.8, 0.2, 0.1], [False, False, True, True]) == 0.0
    assert metrics.auroc([1.0, 1.0, 1.0, 1.0], [False, True, False, True]) == 0.5
    assert math.isnan(metrics.auroc([1.0, 2.0], [False, False]))


def test_top_fraction():
    assert metrics.top_fraction([5.0, 1.0, 3.0, 9.0], 0.25) == [False, False, False, True]
    assert sum(metrics.top_fraction(list(range(20)), 0.1)) == 2
    assert sum(metrics.top_fraction([1.0, 2.0], 0.01)) == 1  # at least one
    with pytest.raises(ValueError, match="fraction"):
        metrics.top_fraction([1.0], 1.5)
