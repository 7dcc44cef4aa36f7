"""The global allocator: the measuring pass against brute force, the budget never exceeded, the
evidence each step cites recomputed from the measurements, and a measured plan end to end."""

from __future__ import annotations

import copy
import dataclasses
import random
import re

import pytest
import torch

import bitcliff
from bitcliff.diagnosis.run import DiagnoseOptions
from bitcliff.quant.rtn import quantize_rtn
from bitcliff.repairs.budget import quantized_weights, width_change_bits
from bitcliff.repairs.lowrank import RANK_STEP, lowrank_bits, output_error
from bitcliff.repairs.measure import Measurements, ModuleCurve, measure_repairs
from bitcliff.repairs.plan import PlanError, plan_repair


@pytest.fixture(scope="module")
def setup():
    from repair_fixtures import repair_setup

    fp, q, calib = repair_setup()
    evaluation = torch.randint(0, 128, (6, 32), generator=torch.Generator().manual_seed(2))
    report = bitcliff.diagnose(fp, q, evaluation, options=DiagnoseOptions.fast(), progress=False)
    return fp, q, calib, evaluation, report, measure_repairs(fp, q, calib, max_rank=16)


def _synthetic(report: dict, seed: int) -> Measurements:
    """Random but plausible curves for every module of ``report``: a decaying spectrum, wider widths
    leaving about a quarter of the error per bit, sensitivities over three decades."""
    rng = random.Random(seed)
    measured = Measurements(windows=1, sensitivity_windows=1)
    for name, m in report["meta"]["modules"].items():
        error = rng.uniform(0.5, 5.0)
        energy = sorted((rng.uniform(0, 1) ** 3 * error / 8 for _ in range(32)), reverse=True)
        widths = {b: error * 0.25 ** (b - m["bits"]) for b in range(m["bits"] + 1, 5)}
        measured.modules[name] = ModuleCurve(name, int(name.split(".")[2]), m["in"], m["out"], m["bits"],
                                             m["group_size"], error, energy, widths, 10 ** rng.uniform(-3, 0))
    return measured


def _diagnosis(label="degradation") -> dict:
    from test_plan import _diagnosis as diagnosis

    return diagnosis(label, [1.0] * 6)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("methods", [None, ["lowrank", "restore"], ["restore"]])
def test_the_allocator_never_exceeds_the_budget_and_spends_it(seed, methods):
    report = _diagnosis()
    measured = _synthetic(report, seed)
    cheapest = min(lowrank_bits(RANK_STEP, 64, 64, 4), width_change_bits(64, 64, (2, 32), (3, 32)))
    for budget in (0.02, 0.1, 0.25, 0.5, 1.0):
        weights = sum(m["in"] * m["out"] for m in report["meta"]["modules"].values())
        if methods == ["restore"] and budget * weights < width_change_bits(64, 64, (2, 32), (3, 32)):
            with pytest.raises(PlanError, match="buys none of restore"):
                plan_repair(report, budget, methods=methods, measured=measured)
            continue
        plan = plan_repair(report, budget, methods=methods, measured=measured, factor_bits=4)
        assert plan.planned_bits <= budget * plan.weights * (1 + 1e-12)
        ranks = plan.steps.get("lowrank", {}).get("module_ranks", {})
        widths = plan.steps.get("restore", {}).get("modules", {})
        assert not set(ranks) & set(widths)  # one option per module
        modules = report["meta"]["modules"]
        counted = sum(lowrank_bits(r, modules[n]["in"], modules[n]["out"], 4) for n, r in ranks.items()) \
            + sum(width_change_bits(modules[n]["in"], modules[n]["out"], (modules[n]["bits"], modules[n]["group_size"]),
                                    (b, modules[n]["group_size"])) for n, b in widths.items())
        assert counted == pytest.approx(plan.planned_bits)
        if methods != ["restore"]:  # left unspent: less than any step would cost
            assert budget * plan.weights - plan.planned_bits < max(cheapest, 0.02 * budget * plan.weights)


def test_each_step_cites_the_measured_gain_that_chose_it():
    report = _diagnosis()
    measured = _synthetic(report, 0)
    plan = plan_repair(report, 0.25, methods=["lowrank", "restore"], measured=measured, factor_bits=4)
    modules = report["meta"]["modules"]
    gains = {}
    for name, rank in plan.steps["lowrank"]["module_ranks"].items():
        curve = measured.modules[name]
        removed = curve.sensitivity * (curve.error - curve.lowrank_error(rank))
        gains[name] = removed / lowrank_bits(rank, modules[name]["in"], modules[name]["out"], 4)
    for name, bits in plan.steps["restore"]["modules"].items():
        curve = measured.modules[name]
        cost = width_change_bits(curve.in_features, curve.out_features, (curve.bits, curve.group_size),
                                 (bits, curve.group_size))
        gains[name] = curve.sensitivity * (curve.error - curve.widths[bits]) / cost
    for method in ("lowrank", "restore"):
        assert plan.steps[method]["evidence"] == pytest.approx({n: gains[n] for n in plan.steps[method]["evidence"]})
    for reason in [r for r in plan.reasons if "per kbit" in r]:
        cited = re.findall(r"(model\.layers\.\d+\.\S+?)(?: rank \d+)? \(([\d.e+-]+) per kbit\)", reason)
        names = [n for n, _ in cited]
        for name, per_kbit in cited:
            assert float(per_kbit) == pytest.approx(gains[name] * 1e3, rel=5e-3)  # three figures
        chosen = plan.steps["lowrank" if "low-rank" in reason else "restore"]["evidence"]
        assert len(names) == min(5, len(chosen))
        assert names == sorted(chosen, key=lambda n: -chosen[n])[:len(names)]  # the best per bit, in order


def test_the_verdict_decides_whether_to_repair_and_the_measurements_decide_how():
    measured = _synthetic(_diagnosis(), 1)
    for label in ("degradation", "collapse", "mixed"):
        plan = plan_repair(_diagnosis(label), 0.5, measured=measured)
        assert plan.allocation["weighed"] == ["restore", "lowrank"]
        assert {"restore", "lowrank"} & set(plan.methods) and "norm" in plan.methods
    assert plan_repair(_diagnosis("healthy"), 0.5, measured=measured).methods == ()
    forced = plan_repair(_diagnosis(), 0.5, methods=["lowrank", "norm"], measured=measured)
    assert forced.allocation["weighed"] == ["lowrank"] and "restore" not in forced.methods


def test_restoration_without_measured_widths_is_refused():
    report = _diagnosis()
    measured = _synthetic(report, 0)
    measured.modules["model.layers.2.mlp.up_proj"].widths.clear()
    with pytest.raises(ValueError, match="up_proj hold no wider width: they cannot weigh restoration"):
        plan_repair(report, 0.5, methods=["restore", "lowrank"], measured=measured)


def test_measurements_of_other_models_than_the_diagnosis_are_refused(setup):
    _, _, _, _, report, measured = setup
    assert measured.fingerprints == report.to_dict()["meta"]["fingerprints"]
    plan_repair(report, 0.5, measured=measured)
    other = dataclasses.replace(measured, fingerprints={**measured.fingerprints, "quantized": "0" * 64})
    with pytest.raises(PlanError, match="measurements were made on other models than the diagnosis"):
        plan_repair(report, 0.5, measured=other)


def test_measurements_of_another_model_are_refused():
    report = _diagnosis()
    measured = _synthetic(report, 0)
    measured.modules.pop("model.layers.3.mlp.up_proj")
    with pytest.raises(ValueError, match="lack module model.layers.3.mlp.up_proj"):
        plan_repair(report, 0.25, measured=measured)


def test_the_measuring_pass_matches_brute_force(setup):
    fp, q, calib, _, _, measured = setup
    assert any(p.requires_grad for p in fp.parameters())
    assert all(p.grad is None for p in fp.parameters())  # the measuring pass formed no weight gradient
    inputs = {}
    hooks = [m.register_forward_hook(lambda mod, args, out, name=name: inputs.setdefault(name, []).append(args[0]))
             for name, m in q.named_modules() if isinstance(m, bitcliff.QuantLinear)]
    with torch.no_grad():
        q(calib[: measured.windows])
    for h in hooks:
        h.remove()
    for name, curve in measured.modules.items():
        x = torch.cat(inputs[name]).reshape(-1, curve.in_features).double()
        covariance = x.t() @ x / len(x)
        module = q.get_submodule(name)
        target = fp.get_submodule(name).weight.detach().float()
        assert curve.error == pytest.approx(output_error(target - module.effective_weight(), covariance), rel=1e-3)
        assert sum(curve.energy) <= curve.error * (1 + 1e-6)
        assert curve.widths[16] == 0.0 and curve.widths[4] < curve.widths[3] < curve.error
        own = bitcliff.QuantConfig(bits=2, group_size=curve.group_size)
        rtn = {b: output_error(target - quantize_rtn(target, dataclasses.replace(own, bits=b)).dequantize(), covariance)
               for b in (2, 3)}
        assert curve.widths[3] == pytest.approx(curve.error * rtn[3] / rtn[2], rel=1e-3)
    # the output sensitivity: the mean squared gradient of the loss at the module's output
    name = next(iter(measured.modules))
    kept = []

    def keep(module, args, output):
        output.retain_grad()
        kept.append(output)

    hook = fp.get_submodule(name).register_forward_hook(keep)
    embed = fp.get_input_embeddings().register_forward_hook(lambda mod, args, out: out.requires_grad_(True))
    grads = []
    for window in calib[: measured.sensitivity_windows]:
        kept.clear()
        fp(input_ids=window[None], labels=window[None]).loss.backward()
        grads.append(kept[0].grad.double().square())
    hook.remove()
    embed.remove()
    assert measured.modules[name].sensitivity == pytest.approx(float(torch.cat(grads).mean()), rel=1e-6)
    fp.zero_grad(set_to_none=True)  # what this brute force formed
    assert Measurements.from_dict(measured.to_dict()) == measured


def test_a_measured_plan_repairs_within_budget_and_loads_back(setup, tmp_path):
    from test_repair import _logit_error, _saved_bits_match_and_load_back

    from bitcliff.repairs.plan import RepairPlan

    fp, q, calib, evaluation, report, measured = setup
    plan = plan_repair(report, 0.5, methods=["lowrank", "restore", "norm"], measured=measured, factor_bits=4)
    assert plan.allocation["by"] == "measured" and RepairPlan.from_dict(plan.to_dict()) == plan
    repaired = copy.deepcopy(q)
    result = bitcliff.repair(fp, repaired, calib, plan, progress=False)
    assert result.record.bits == pytest.approx(plan.planned_bits)
    assert result.record.bits <= 0.5 * quantized_weights(q)
    ranks = plan.steps.get("lowrank", {}).get("module_ranks", {})
    widths = plan.steps.get("restore", {}).get("modules", {})
    assert ranks or widths
    assert {m.module: m.rank for m in result.record.modules if m.rank} == ranks
    assert {m.module: m.restored_bits for m in result.record.modules if m.restored_bits} == widths
    assert _logit_error(fp, repaired, calib) < _logit_error(fp, q, calib)
    back = bitcliff.load(bitcliff.save(repaired, tmp_path / "mixed"))
    with torch.no_grad():
        torch.testing.assert_close(back(evaluation).logits, repaired(evaluation).logits, rtol=0, atol=1e-5)
    # low rank alone: the bits counted are the bytes of its factor file
    plan = plan_repair(report, 0.5, methods=["lowrank", "norm"], measured=measured, factor_bits=4)
    repaired = copy.deepcopy(q)
    result = bitcliff.repair(fp, repaired, calib, plan, progress=False)
    _saved_bits_match_and_load_back(repaired, result, evaluation, tmp_path / "lowrank", "lowrank.safetensors")


def test_an_unknown_allocator_is_refused(setup):
    from bitcliff.repairs.run import diagnose_and_repair

    fp, q, calib, _, report, _ = setup
    with pytest.raises(PlanError, match="allocator must be one of"):
        diagnose_and_repair(fp, copy.deepcopy(q), calib, 0.25, diagnosis=report.to_dict(),
                            plan_options={"allocator": "greedy"})


def test_a_diagnosis_of_another_model_is_refused_even_when_healthy(setup):
    """A healthy verdict plans nothing: the fingerprints are checked all the same, first."""
    from bitcliff.repairs.run import diagnose_and_repair

    fp, q, calib, _, report, _ = setup
    other = copy.deepcopy(report.to_dict())
    other["verdict"]["label"] = "healthy"
    other["meta"]["fingerprints"] = {**other["meta"]["fingerprints"], "fp": "0" * 64}
    with pytest.raises(ValueError, match="made on another full-precision model"):
        diagnose_and_repair(fp, copy.deepcopy(q), calib, 0.25, diagnosis=other)


def test_a_rank_beyond_the_measured_spectrum_is_refused_not_dropped():
    report = _diagnosis()
    measured = _synthetic(report, 0)  # spectra of 32 ranks, modules of 64 x 64
    assert plan_repair(report, 0.5, methods=["lowrank"], rank=32, measured=measured).steps["lowrank"]
    with pytest.raises(ValueError, match="cover ranks up to 32, the plan asks for 36: measure again"):
        plan_repair(report, 0.5, methods=["lowrank"], rank=36, measured=measured)


def test_non_finite_measurements_are_refused():
    report = _diagnosis()
    measured = _synthetic(report, 0)
    measured.modules["model.layers.1.mlp.down_proj"].sensitivity = float("nan")
    with pytest.raises(ValueError, match="down_proj hold a negative, NaN or infinite value"):
        plan_repair(report, 0.5, measured=measured)


def test_the_measuring_pass_runs_only_when_a_repair_can_be_weighed(setup, monkeypatch):
    import bitcliff.repairs.run as run

    fp, q, calib, _, report, _ = setup
    calls = []
    monkeypatch.setattr(run, "measure_repairs", lambda *a, **k: calls.append(k) or measure_repairs(*a, **k))
    outcome = run.diagnose_and_repair(fp, copy.deepcopy(q), calib, 0.5, diagnosis=report,  # a report object
                                      plan_options={"methods": ["norm"]})
    assert not calls and outcome.plan.allocation["by"] == "diagnosis"
    with pytest.raises(PlanError, match="factor_bits"):  # a bad option is refused before any measuring
        run.diagnose_and_repair(fp, copy.deepcopy(q), calib, 0.5, diagnosis=report, plan_options={"factor_bits": 8})
    assert not calls
    outcome = run.diagnose_and_repair(fp, copy.deepcopy(q), calib, 0.5, diagnosis=report,
                                      plan_options={"max_rank": 20})
    assert calls == [{"max_rank": 20, "progress": False}] and outcome.plan.allocation["by"] == "measured"
