"""The repair walk on a tiny model: each repair does what it claims, the bits are counted, and a
repaired checkpoint (adapter, restored modules, biases) loads back exactly."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import bitcliff
from bitcliff import QuantConfig
from bitcliff.diagnosis.run import DiagnoseOptions
from bitcliff.quant.adapter import AdapterError
from bitcliff.quant.qlinear import QuantLinear
from bitcliff.repairs.budget import quantized_weights


@pytest.fixture(scope="module")
def setup():
    from repair_fixtures import repair_setup

    fp, q, calib = repair_setup()
    evaluation = torch.randint(0, 128, (6, 32), generator=torch.Generator().manual_seed(2))
    report = bitcliff.diagnose(fp, q, evaluation, options=DiagnoseOptions.fast(), progress=False)
    return fp, q, calib, evaluation, report


def _logit_error(fp, model, ids) -> float:
    with torch.no_grad():
        return float(((model(ids).logits - fp(ids).logits) ** 2).mean())


def _saved_bits_match_and_load_back(repaired, result, evaluation, folder, file: str) -> dict:
    """Save ``repaired``; the bits ``result`` counted are the bytes of ``file`` in the checkpoint,
    and the checkpoint loads back to the same logits.  Returns ``file`` 's tensors."""
    from safetensors.torch import load_file

    out = bitcliff.save(repaired, folder)
    stored = load_file(out / file)
    assert 8 * sum(t.numel() * t.element_size() for t in stored.values()) == pytest.approx(result.record.bits)
    back = bitcliff.load(out)
    with torch.no_grad():
        torch.testing.assert_close(back(evaluation).logits, repaired(evaluation).logits, rtol=0, atol=1e-5)
    return stored


@pytest.mark.parametrize("methods", [["bias"], ["norm"], ["lowrank"], ["restore"], ["outliers"], None])
def test_each_repair_lowers_the_error_within_its_budget(setup, methods):
    fp, q, calib, evaluation, report = setup
    repaired = copy.deepcopy(q)
    plan = bitcliff.plan_repair(report, budget=0.5, methods=methods)
    result = bitcliff.repair(fp, repaired, calib, plan, progress=False)
    assert result.record.bits <= 0.5 * quantized_weights(q)
    assert _logit_error(fp, repaired, calib) < _logit_error(fp, q, calib)
    touched = [m for m in result.record.modules if m.bias or m.rank or m.restored_bits or m.outliers]
    assert bool(touched) == any(x in plan.methods for x in ("bias", "lowrank", "restore", "outliers"))
    for entry in result.record.modules:  # every repair lowers its own module's output error
        assert entry.error_after <= entry.error_before * (1 + 1e-6) + 1e-9


def test_bias_correction_matches_the_fp_mean_output_in_the_first_layer(setup):
    fp, q, calib, _, report = setup
    repaired = copy.deepcopy(q)
    bitcliff.repair(fp, repaired, calib, bitcliff.plan_repair(report, budget=0.5, methods=["bias"]), progress=False)
    outputs = {}
    for name, model in (("fp", fp), ("q", repaired)):  # layer 0 sees the same input in both models
        module = model.model.layers[0].self_attn.q_proj
        handle = module.register_forward_hook(lambda m, a, out, name=name: outputs.__setitem__(name, out))
        with torch.no_grad():
            model(calib)
        handle.remove()
    mean_fp, mean_q = outputs["fp"][:, 1:].mean((0, 1)), outputs["q"][:, 1:].mean((0, 1))  # the walk skips position 0
    assert float((mean_q - mean_fp).abs().max()) < 1e-3 * float(outputs["fp"].abs().mean()) + 1e-4


def test_a_repaired_checkpoint_loads_back_exactly(setup, tmp_path):
    fp, q, calib, evaluation, report = setup
    repaired = copy.deepcopy(q)
    plan = bitcliff.plan_repair(report, budget=2.0, methods=["restore", "bias", "lowrank", "norm"], factor_bits=16)
    result = bitcliff.repair(fp, repaired, calib, plan, progress=False)
    assert any(m.rank for m in result.record.modules) and any(m.restored_bits for m in result.record.modules)
    out = bitcliff.save(repaired, tmp_path / "r", extra_files=result.files())
    config = json.loads((out / "config.json").read_text())
    assert config["attention_bias"] and config["mlp_bias"]  # readers build biased projections
    assert any(k.startswith("+:") for k in config["quantization_config"]["dynamic"])
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "LORA" and adapter["rank_pattern"]
    assert json.loads((out / "repair.json").read_text())["plan"]["budget"] == 2.0
    back = bitcliff.load(out)
    with torch.no_grad():
        torch.testing.assert_close(back(evaluation).logits, repaired(evaluation).logits, rtol=0, atol=1e-5)
    restored = [n for n, m in back.named_modules() if isinstance(m, QuantLinear) and m.bits == 4]
    assert restored and all(n in plan.restore for n in restored)


def test_an_adapter_that_does_not_fit_its_checkpoint_is_refused(setup, tmp_path):
    from safetensors.torch import load_file, save_file

    fp, q, calib, _, report = setup
    repaired = copy.deepcopy(q)
    result = bitcliff.repair(fp, repaired, calib, bitcliff.plan_repair(report, 1.0, methods=["lowrank"], factor_bits=16),
                             progress=False)
    out = bitcliff.save(repaired, tmp_path / "r")
    tensors = load_file(out / "adapter_model.safetensors")
    key = next(k for k in tensors if k.endswith("lora_A.weight"))
    tensors[key] = torch.zeros(tensors[key].shape[0], 7, dtype=torch.float16)
    save_file(tensors, out / "adapter_model.safetensors")
    from bitcliff.quant.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="adapter_model.safetensors is not this checkpoint's own"):
        bitcliff.load(out)
    (out / ".bitcliff-manifest.json").unlink()  # a folder without a manifest: the adapter's own checks
    with pytest.raises(AdapterError, match=r"A \(\d+, 7\), B \(\d+, \d+\) do not fit a \[\d+, \d+\] layer"):
        bitcliff.load(out)
    assert result.record.bits > 0


def test_a_plan_for_another_quantization_is_refused(setup):
    fp, q, calib, _, report = setup
    other = bitcliff.quantize(copy.deepcopy(fp), QuantConfig(bits=3, group_size=32), progress=False)
    with pytest.raises(ValueError, match="made on another quantized model"):
        bitcliff.repair(fp, other, calib, bitcliff.plan_repair(report, 0.5), progress=False)


def test_restoring_every_module_is_gptq_at_the_new_width(setup):
    """Restoration re-solves GPTQ on the repaired model's inputs, all positions counted: restoring
    everything to 4 bits must give exactly what quantizing to 4 bits in the first place gives."""
    from bitcliff.repairs.plan import RepairPlan

    fp, q, calib, evaluation, _ = setup
    names = [n for n, m in q.named_modules() if isinstance(m, QuantLinear)]
    plan = RepairPlan(budget=10.0, verdict="collapse", methods=("restore",),
                      steps={"restore": {"modules": {n: 4 for n in names}}}, weights=quantized_weights(q))
    restored = copy.deepcopy(q)
    bitcliff.repair(fp, restored, calib, plan, progress=False)
    config = bitcliff.QuantConfig(bits=4, group_size=32, method="gptq", calib_samples=8)
    direct = bitcliff.quantize(copy.deepcopy(fp), config, calib_ids=calib, progress=False)
    for name in names:
        a, b = restored.get_submodule(name), direct.get_submodule(name)
        assert torch.equal(a.qweight, b.qweight) and torch.equal(a.scales, b.scales), name


@pytest.mark.parametrize("damage", ["adapter_config.json", "adapter_model.safetensors", "nan"])
def test_a_repair_that_cannot_be_loaded_is_an_error_not_a_silent_unrepaired_model(setup, tmp_path, damage):
    from safetensors.torch import load_file, save_file

    from bitcliff.quant.checkpoint import CheckpointError

    fp, q, calib, _, report = setup
    repaired = copy.deepcopy(q)
    bitcliff.repair(fp, repaired, calib, bitcliff.plan_repair(report, 1.0, methods=["lowrank"], factor_bits=16),
                    progress=False)
    out = bitcliff.save(repaired, tmp_path / "r")
    if damage == "nan":
        tensors = load_file(out / "adapter_model.safetensors")
        key = next(k for k in tensors if k.endswith("lora_B.weight"))
        tensors[key][0, 0] = float("nan")
        save_file(tensors, out / "adapter_model.safetensors")
        with pytest.raises(CheckpointError, match="adapter_model.safetensors is not this checkpoint's own"):
            bitcliff.load(out)  # its bytes differ from the digest the manifest records
        (out / ".bitcliff-manifest.json").unlink()  # a folder without a manifest: the adapter's own checks
        with pytest.raises(AdapterError, match=f"tensor {key} holds NaN or Inf values"):
            bitcliff.load(out)
        return
    (out / damage).unlink()
    with pytest.raises(CheckpointError, match=f"lacks {damage}, which bitcliff wrote there"):
        bitcliff.load(out)


def test_sparse_outliers_load_back_exactly_and_their_bits_are_the_bytes_on_disk(setup, tmp_path):
    from safetensors.torch import save_file

    from bitcliff.quant.checkpoint import CheckpointError

    fp, q, calib, evaluation, report = setup
    repaired = copy.deepcopy(q)
    result = bitcliff.repair(fp, repaired, calib, bitcliff.plan_repair(report, 0.5, methods=["outliers"]),
                             progress=False)
    kept = [m for m in result.record.modules if m.outliers]
    assert kept and result.record.bits <= 0.5 * quantized_weights(q)
    out = tmp_path / "r"
    stored = _saved_bits_match_and_load_back(repaired, result, evaluation, out, "outliers.safetensors")
    key = next(k for k in stored if k.endswith("outlier_col"))
    stored[key] = stored[key] + 1000  # columns past the layer: another checkpoint's file
    save_file(stored, out / "outliers.safetensors")
    with pytest.raises(CheckpointError, match="not this checkpoint's own"):
        bitcliff.load(out)


@pytest.mark.parametrize("file, methods", [("outliers.safetensors", ["outliers"]),
                                           ("lowrank.safetensors", ["lowrank"])])
def test_a_side_file_from_another_checkpoint_is_refused(setup, tmp_path, file, methods):
    """A repair's file copied into another checkpoint of the same model fits its modules: only the
    digest the manifest records tells it apart.  A stray one in a plain checkpoint is refused too."""
    import shutil

    from bitcliff.quant.checkpoint import CheckpointError

    fp, q, calib, evaluation, report = setup
    folders = []
    for budget in (0.25, 0.5):
        repaired = copy.deepcopy(q)
        bitcliff.repair(fp, repaired, calib, bitcliff.plan_repair(report, budget, methods=methods), progress=False)
        folders.append(bitcliff.save(repaired, tmp_path / f"r{budget}"))
    shutil.copy(folders[0] / file, folders[1] / file)
    with pytest.raises(CheckpointError, match=f"{file} is not this checkpoint's own .its bytes differ"):
        bitcliff.load(folders[1])
    plain = bitcliff.save(q, tmp_path / "plain")
    shutil.copy(folders[0] / file, plain / file)
    with pytest.raises(CheckpointError, match="its manifest does not list it"):
        bitcliff.load(plain)
    (plain / ".bitcliff-manifest.json").unlink()  # a folder bitcliff did not write: nothing binds the file
    with pytest.raises(CheckpointError, match=f"holds {file} but no bitcliff manifest"):
        bitcliff.load(plain)


@pytest.mark.parametrize("methods", [["outliers"], ["restore"]])
def test_a_mixed_precision_model_is_repaired_at_each_modules_own_setting(setup, methods, tmp_path):
    """A share group whose members have different widths: outliers re-solve each member at its own
    width and group size, restoration keeps the module's group size."""
    fp, _, calib, evaluation, _ = setup
    k_proj, up_proj = "model.layers.0.self_attn.k_proj", "model.layers.1.mlp.up_proj"
    config = QuantConfig(bits=2, group_size=32, module_widths=((k_proj, 3, 64), (up_proj, 4, 16)))
    q = bitcliff.quantize(copy.deepcopy(fp), config, progress=False)
    report = bitcliff.diagnose(fp, q, evaluation, options=DiagnoseOptions.fast(), progress=False)
    repaired = copy.deepcopy(q)
    plan = bitcliff.plan_repair(report, budget=0.5, methods=methods)
    result = bitcliff.repair(fp, repaired, calib, plan, progress=False)
    assert result.record.bits <= 0.5 * quantized_weights(q)
    assert _logit_error(fp, repaired, calib) < _logit_error(fp, q, calib)
    for name, module in repaired.named_modules():
        if isinstance(module, QuantLinear):
            own = config.for_module(name)
            assert module.group_size == own.group_size, name
            restored = next(m.restored_bits for m in result.record.modules if m.module == name)
            assert module.bits == (restored or own.bits), name
    if methods == ["outliers"]:
        entries = {m.module: m for m in result.record.modules}
        assert entries[k_proj].outliers and entries["model.layers.0.self_attn.q_proj"].outliers
    back = bitcliff.load(bitcliff.save(repaired, tmp_path / "r"))
    with torch.no_grad():
        torch.testing.assert_close(back(evaluation).logits, repaired(evaluation).logits, rtol=0, atol=1e-5)


def test_alternating_refinement_never_raises_a_modules_error_and_loads_back(setup, tmp_path):
    """Low rank with rounds of re-quantizing ``W − BA``: every module's output error after the repair
    is at most what the factors alone leave, and the new codes and factors load back exactly."""
    fp, q, calib, evaluation, report = setup
    plain, refined = copy.deepcopy(q), copy.deepcopy(q)
    base = bitcliff.repair(fp, plain, calib, bitcliff.plan_repair(report, 0.5, methods=["lowrank"], refine_rounds=0),
                           progress=False)
    plan = bitcliff.plan_repair(report, 0.5, methods=["lowrank"], refine_rounds=2)
    result = bitcliff.repair(fp, refined, calib, plan, progress=False)
    assert result.record.bits <= 0.5 * quantized_weights(q)
    changed = [n for n, m in refined.named_modules() if isinstance(m, QuantLinear)
               and not torch.equal(m.qweight, q.get_submodule(n).qweight)]
    assert changed, "no round was kept: the refinement went untested"
    for entry in result.record.modules:
        assert entry.error_after <= entry.error_before * (1 + 1e-6) + 1e-9
    assert _logit_error(fp, refined, calib) < _logit_error(fp, q, calib)
    assert sum(e.error_after for e in result.record.modules) < sum(e.error_after for e in base.record.modules)
    back = bitcliff.load(bitcliff.save(refined, tmp_path / "r"))
    with torch.no_grad():
        torch.testing.assert_close(back(evaluation).logits, refined(evaluation).logits, rtol=0, atol=1e-5)
    from bitcliff.repairs.plan import PlanError

    with pytest.raises(PlanError, match="refine_rounds"):
        bitcliff.plan_repair(report, 0.5, methods=["lowrank"], refine_rounds=-1)


@pytest.mark.parametrize("factor_bits", [4, 2])
def test_quantized_low_rank_factors_are_charged_the_bytes_they_store_and_load_back_exactly(setup, tmp_path,
                                                                                           factor_bits):
    from safetensors.torch import save_file

    from bitcliff.quant.checkpoint import CheckpointError

    fp, q, calib, evaluation, report = setup
    repaired = copy.deepcopy(q)
    plan = bitcliff.plan_repair(report, 0.5, methods=["lowrank"], factor_bits=factor_bits)
    result = bitcliff.repair(fp, repaired, calib, plan, progress=False)
    ranked = [m for m in result.record.modules if m.rank]
    assert ranked and result.record.bits <= 0.5 * quantized_weights(q)
    assert all(repaired.get_submodule(m.module).lowrank_factors.bits == factor_bits for m in ranked)
    assert _logit_error(fp, repaired, calib) < _logit_error(fp, q, calib)
    fp16 = bitcliff.repair(fp, copy.deepcopy(q), calib,
                           bitcliff.plan_repair(report, 0.5, methods=["lowrank"], factor_bits=16), progress=False)
    assert max(m.rank for m in ranked) > max(m.rank for m in fp16.record.modules)  # more rank for the bits
    out = tmp_path / "r"
    stored = _saved_bits_match_and_load_back(repaired, result, evaluation, out, "lowrank.safetensors")
    assert not (out / "adapter_config.json").exists()
    key = next(k for k in stored if k.endswith("lora_A.scales"))
    stored[key] = stored[key][:, :1].contiguous()  # another checkpoint's factors
    save_file(stored, out / "lowrank.safetensors")
    with pytest.raises(CheckpointError, match="lowrank.safetensors is not this checkpoint's own"):
        bitcliff.load(out)
    (out / "lowrank.safetensors").unlink()
    with pytest.raises(CheckpointError, match="lacks lowrank.safetensors"):
        bitcliff.load(out)
    from bitcliff.repairs.plan import PlanError

    with pytest.raises(PlanError, match=r"factor_bits must be one of \(2, 3, 4, 16\), got 8"):
        bitcliff.plan_repair(report, 0.5, methods=["lowrank"], factor_bits=8)
