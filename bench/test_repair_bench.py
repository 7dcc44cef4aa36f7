"""The repair table's baselines and its plot, on synthetic inputs."""

from __future__ import annotations

import pytest

from bench.repair_report import bits_per_weight, markdown, plot, uniform_ppl
from bench.repair_table import LLAMA_CPP_PRIORITY, heuristic_plan, use_more_bits

KINDS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _diagnosis(n_layers: int = 16, k: int = 64, n: int = 64) -> dict:
    modules = {f"model.layers.{i}.{kind}": {"in": k, "out": n, "bits": 3, "group_size": 32}
               for i in range(n_layers) for kind in KINDS}
    return {"meta": {"modules": modules, "n_layers": n_layers}, "verdict": {"label": "degradation"}}


def test_use_more_bits_is_llama_cpps_rule():
    # 16 layers: the first and last eighth (0, 1, 14, 15) and every third layer between from 4 on.
    assert [i for i in range(16) if use_more_bits(i, 16)] == [0, 1, 4, 7, 10, 13, 14, 15]


@pytest.mark.parametrize("budget", [0.05, 0.3, 1.0])
def test_heuristic_plan_follows_the_fixed_priority_within_the_budget(budget):
    diagnosis = _diagnosis()
    plan = heuristic_plan(diagnosis, budget)
    assert plan.planned_bits <= budget * plan.weights
    assert all(bits == 4 for bits in plan.restore.values())
    restored_kinds = {name.split(".", 3)[3] for name in plan.restore}
    # A kind is touched only once every kind ranked above it is restored in every layer.
    for rank, kind in enumerate(LLAMA_CPP_PRIORITY):
        if kind in restored_kinds:
            for better in LLAMA_CPP_PRIORITY[:rank]:
                assert sum(n.endswith(better) for n in plan.restore) == 16
    down = sorted(int(n.split(".")[2]) for n in plan.restore if n.endswith("mlp.down_proj"))
    order = [i for i in range(16) if use_more_bits(i, 16)] + [i for i in range(16) if not use_more_bits(i, 16)]
    assert down and down == sorted(order[: len(down)])  # favoured layers first, then the rest in order


def test_the_plot_draws_uniform_curves_and_repair_points():
    def row(bits, variant, ppl, spent=0.0, group=64):
        return {"method": "gptq", "bits": bits, "group_size": group, "variant": variant,
                "effective_bits": bits + (16 + bits) / group, "bits_spent": spent,
                "ppl": {"wiki": ppl, "canterbury": 2 * ppl}}

    rows = [row(4, "none", 28.0), row(3, "none", 48.0), row(3, "none", 45.0, group=32),
            row(3, "plan", 40.0, 0.25), row(3, "restore", 41.0, 0.25)]
    assert bits_per_weight(rows[3]) == pytest.approx(3.2969 + 0.25, abs=1e-3)
    figure = plot(rows)
    wiki = figure.axes[0]
    lines = {line.get_label(): line for line in wiki.get_lines()}
    assert set(lines) == {"GPTQ g64, uniform bits", "GPTQ g32, uniform bits", "GPTQ + plan", "GPTQ + restore"}
    assert list(lines["GPTQ g64, uniform bits"].get_ydata()) == [48.0, 28.0]  # sorted by bits
    assert list(figure.axes[1].get_lines()[0].get_ydata()) != list(wiki.get_lines()[0].get_ydata())


def test_the_uniform_curve_interpolates_in_log_perplexity():
    rows = [{"method": "gptq", "bits": b, "group_size": 64, "variant": "none", "budget": 0.0,
             "effective_bits": float(b), "bits_spent": 0.0, "ppl": {"wiki": p, "canterbury": p}}
            for b, p in ((3, 40.0), (4, 10.0))]
    assert uniform_ppl(rows, "gptq", 3.5, "wiki") == pytest.approx(20.0)  # the geometric mean
    assert uniform_ppl(rows, "gptq", 4.5, "wiki") != uniform_ppl(rows, "gptq", 4.5, "wiki")  # NaN outside
    rows.append({**rows[0], "variant": "plan", "budget": 0.5, "bits_spent": 0.5, "ppl": {"wiki": 15.0, "canterbury": 30.0},
                 "recovery": {"wiki": 0.5, "canterbury": 0.1}, "seconds": 12.0})
    table = markdown(rows)
    assert "| GPTQ W3 g64 | plan | 0.500 | 3.50 | 15.00 | 30.00 | 50% | 10% | 20.00 | 12 |" in table


def test_a_variant_names_its_repairs_and_low_rank_settings():
    from bench.repair_table import plan_options

    assert plan_options("plan") == {}
    assert plan_options("norm+lowrank@q4@r128") == {"methods": ["norm", "lowrank"], "factor_bits": 4, "max_rank": 128}
    with pytest.raises(SystemExit, match="settings are @qB"):
        plan_options("lowrank@x4")
