"""The damage law: recovers a planted law, predicts with intervals, refuses what it cannot fit."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bitcliff.study.law import LawError, fit_law, predict

TRUE = {"c": -2.0, "N": -0.3, "b_eff": -4.0, "C": -0.25, "G": 0.4}


def synthetic_rows(noise: float = 0.05, seed: int = 0) -> list[dict]:
    """GPTQ-like rows whose damage follows TRUE with log-normal noise."""
    rng = np.random.default_rng(seed)
    rows = []
    for n in (2e6, 8e6, 3.2e7):
        for bits in (2, 3, 4):
            for g in (32, 64, 128):
                for c in (8, 16, 32, 64):
                    b_eff = bits + (16 + bits) / g
                    log_d = (TRUE["c"] + TRUE["N"] * math.log(n) + TRUE["b_eff"] * math.log(b_eff)
                             + TRUE["C"] * math.log(c) + TRUE["G"] * math.log(g) + rng.normal(0, noise))
                    damage = math.exp(log_d)
                    rows.append({"method": "gptq", "parameters": n, "hidden_size": 256, "group_size": g, "calib": c,
                                 "effective_bits": b_eff, "damage": {"overall": damage, "utilization": damage / 2},
                                 "nll": {"overall": 3.0 + damage}, "nll_fp": {"overall": 3.0}})
    return rows


def test_the_fit_recovers_the_exponents_of_a_planted_law():
    fit = fit_law(synthetic_rows(), "overall", "gptq")
    exponents, intervals = fit.exponents(), fit.intervals()
    for factor in ("N", "b_eff", "C", "G"):
        assert exponents[factor] == pytest.approx(TRUE[factor], abs=0.1)
        assert intervals[factor][0] <= TRUE[factor] <= intervals[factor][1]
    assert fit.r2 > 0.99 and fit.loo_rmse < 0.08 and fit.loo_ppl_error < 0.02
    assert fit.most_sensitive() == "b_eff"


def test_noise_widens_the_intervals_and_the_truth_stays_inside():
    fit = fit_law(synthetic_rows(noise=0.5, seed=3), "overall", "gptq")
    intervals = fit.intervals()
    assert intervals["b_eff"][1] - intervals["b_eff"][0] > 0.3
    assert intervals["b_eff"][0] <= TRUE["b_eff"] <= intervals["b_eff"][1]


def test_a_prediction_inside_the_range_lands_in_its_interval_and_outside_warns():
    rows = synthetic_rows()
    fit = fit_law(rows, "overall", "gptq")
    inside = {"N": 8e6, "b_eff": 3 + 19 / 96, "C": 24.0, "G": 96.0}
    truth = math.exp(TRUE["c"] + sum(TRUE[f] * math.log(v) for f, v in inside.items()))
    p = predict(fit, inside, nll_fp=3.0)
    assert p.damage_interval[0] <= truth <= p.damage_interval[1]
    assert p.ppl == pytest.approx(math.exp(3.0 + p.damage))
    with pytest.warns(UserWarning, match="outside the fitted range: N=1e\\+09"):
        predict(fit, {**inside, "N": 1e9})


def test_too_few_rows_an_unknown_stratum_and_one_valued_factors():
    rows = synthetic_rows()
    with pytest.raises(LawError, match="unknown stratum 'reasoning'"):
        fit_law(rows, "reasoning", "gptq")
    with pytest.raises(LawError, match="3 gptq rows with a positive overall damage: too few"):
        fit_law(rows[:3], "overall", "gptq")
    one_size = [r for r in rows if r["parameters"] == 2e6]
    fit = fit_law(one_size, "overall", "gptq")
    assert "N" not in fit.free and fit.exponents()["N"] == 0.0
    with pytest.warns(UserWarning, match="the sweep only had 2e\\+06"):
        predict(fit, {"N": 8e6, "b_eff": 3.3, "C": 16.0, "G": 64.0})
    negative = [{**r, "damage": {"overall": -0.01}} for r in rows[:5]] + rows[5:]
    assert fit_law(negative, "overall", "gptq").dropped == 5
