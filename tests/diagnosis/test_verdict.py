"""The verdict's decision rule on constructed measurements."""

from __future__ import annotations

import pytest

from bitcliff.diagnosis.components import ComponentAssessment
from bitcliff.diagnosis.patching import PatchingResult
from bitcliff.diagnosis.signal import SignalTrace
from bitcliff.diagnosis.verdict import Thresholds, decide

N = 6


def _signal(cos: float, top1: float) -> SignalTrace:
    flat = [0.1] * N
    return SignalTrace(flat, [cos] * N, [None] + [1.0] * (N - 1), flat, flat, [1.0] * N, flat, [top1] * N,
                       [0.0] * N, tokens=10, examples=1)


def _components(f: float, js: float) -> ComponentAssessment:
    function = {run: {"attn": [f] * N, "mlp": [f] * N} for run in ("prop", "local")}
    return ComponentAssessment(function, {run: [[js, js]] * N for run in ("prop", "local")},
                               {run: [0.9] * N for run in ("prop", "local")}, examples=1)


def _patching(total: float) -> PatchingResult:
    return PatchingResult({"attn": [total / (2 * N)] * N, "mlp": [total / (2 * N)] * N, "residual": [1.0] * N},
                          damage_nats=0.5, total_single=total, examples=1, tokens_per_example=10)


def test_all_collapse_indicators():
    v = decide(_signal(0.5, 0.05), _components(-0.5, 0.5), _patching(-0.2), ppl_ratio=1000.0)
    assert v.label == "collapse" and v.agreement == 1.0
    assert len(v.evidence) == 4 + 1 and v.repair_targets  # four indicators and the patching line
    assert "restoring the FP residual stream after layer 0" in v.evidence[-1]
    assert v.headline().startswith("verdict: computation collapse (4 of 4 indicators agree)")
    assert "structural" in v.recommendation


def test_intact_computation_with_loss_is_degradation():
    v = decide(_signal(0.99, 0.8), _components(0.8, 0.01), _patching(1.0), ppl_ratio=1.3)
    assert v.label == "degradation" and v.agreement == 1.0
    assert "compensation" in v.recommendation


def test_healthy_needs_small_ppl_ratio():
    good = (_signal(0.999, 0.95), _components(0.95, 0.001), _patching(1.0))
    assert decide(*good, ppl_ratio=1.01).label == "healthy"
    assert decide(*good, ppl_ratio=1.2).label == "degradation"


def test_split_indicators_are_mixed_and_thresholds_are_honoured():
    # early cosine and final agreement fire, the components look fine
    v = decide(_signal(0.5, 0.05), _components(0.8, 0.01), _patching(1.0), ppl_ratio=5.0)
    assert v.label == "mixed"
    assert v.agreement == pytest.approx(0.5)  # an even split: half vote collapse
    assert v.headline().endswith("(2 of 4 indicators vote collapse)")
    relaxed = Thresholds(early_cosine=0.4, final_agreement=0.01)
    assert decide(_signal(0.5, 0.05), _components(0.8, 0.01), _patching(1.0), 5.0, relaxed).label == "degradation"


def test_patching_describes_but_does_not_vote():
    with_patching = decide(_signal(0.5, 0.05), _components(-0.5, 0.5), _patching(5.0), ppl_ratio=100.0)
    without = decide(_signal(0.5, 0.05), _components(-0.5, 0.5), None, ppl_ratio=100.0)
    names = ["early_cosine", "early_function", "early_attention", "final_agreement"]
    assert [i.name for i in with_patching.indicators] == [i.name for i in without.indicators] == names
    assert with_patching.label == without.label == "collapse"
    assert len(without.evidence) == 4


def test_three_of_four_is_collapse():
    v = decide(_signal(0.5, 0.05), _components(-0.5, 0.01), None, ppl_ratio=100.0)  # attention is fine
    assert v.label == "collapse" and v.agreement == pytest.approx(0.75)


def test_verdict_from_a_saved_report_dict():
    from dataclasses import asdict

    from bitcliff.diagnosis.verdict import verdict_from_dict

    signal, comps, patching = _signal(0.99, 0.8), _components(0.8, 0.01), _patching(1.0)
    data = {"signal": asdict(signal), "components": asdict(comps), "patching": asdict(patching),
            "ppl_fp": 10.0, "ppl_q": 13.0}
    assert verdict_from_dict(data).to_dict() == decide(signal, comps, patching, 1.3).to_dict()
