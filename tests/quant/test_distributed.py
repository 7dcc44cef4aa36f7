"""GPTQ over several ranks (gloo, loopback): the same checkpoint as one process, a lost rank
named by the others, and the resume after it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from gptq_helpers import assert_same_tensors, calib, folder_tensors, gptq, tiny_model
from rank_workers import quantize_in_memory, quantize_streaming, run_ranks

from bitcliff.distributed import Ranks
from bitcliff.quant.gptq_model import quantize_gptq
from bitcliff.quant.gptq_stream import quantize_gptq_streaming
from bitcliff.statistics import HessianAccumulator


def test_shares_are_contiguous_balanced_and_cover_every_batch():
    for world in (1, 2, 3, 5):
        for n in (world, 7, 16):
            shares = [Ranks(rank=r, world=world).share(n) for r in range(world)]
            assert [i for s in shares for i in s] == list(range(n))
            assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_owners_balance_the_solve_cost_the_same_on_every_rank():
    costs = [9.0, 1.0, 4.0, 4.0, 1.0]
    owners = [Ranks(rank=r, world=2).owners(costs) for r in range(2)]
    assert owners[0] == owners[1]
    load = [sum(c for c, o in zip(costs, owners[0]) if o == r) for r in range(2)]
    assert sorted(load) == [9.0, 10.0]
    assert Ranks.single().owners(costs) == [0] * 5


def test_hessian_parts_merged_in_rank_order_equal_one_accumulator_bit_for_bit():
    torch.manual_seed(0)
    batches = [torch.randn(3, 37, 600) * (1 + i) for i in range(8)]  # 600: the block-staircase sum
    one = HessianAccumulator(600)
    for b in batches:
        one.add(b)
    for world in (2, 4, 8):
        shares = [HessianAccumulator(600) for _ in range(world)]
        for i, b in enumerate(batches):
            shares[i * world // len(batches)].add(b)
        total = HessianAccumulator(600)
        for acc in shares:
            total.merge(acc.parts(), acc.count)
        assert total.count == one.count
        assert torch.equal(total.hessian(), one.hessian())
    exact = sum(b.reshape(-1, 600).double().t() @ b.reshape(-1, 600).double() for b in batches) * 2 / one.count
    torch.testing.assert_close(one.hessian().double(), exact, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("settings", [{"true_sequential": True, "refit_rounds": 1}, {"true_sequential": False}])
def test_two_ranks_give_the_one_process_checkpoint_bit_for_bit(tmp_path, settings):
    config = gptq(calib_samples=8, **settings)
    torch.set_num_threads(1)  # the ranks run one thread each; BLAS sums may depend on the count
    try:
        one = quantize_gptq(tiny_model(), config, progress=False, calib_ids=calib(8), batch_size=2)
    finally:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))
    assert run_ranks(quantize_in_memory, 2, config, 8, 2, tmp_path) == [0, 0]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for rank in ranks:  # 4 batches: two per rank, whole subtrees of the one-process Hessian sums
        assert_same_tensors(rank["tensors"], _tensors(one))
        assert [e["loss"] for e in rank["log"]] == [e.loss for e in one.bitcliff_log]
        assert [e["tokens"] for e in rank["log"]] == [e.tokens for e in one.bitcliff_log]


def _tensors(model):
    from gptq_helpers import quant_tensors

    return quant_tensors(model)


def test_uneven_shares_still_agree_across_ranks_and_with_one_process_closely(tmp_path):
    config = gptq(calib_samples=6)
    one = quantize_gptq(tiny_model(), config, progress=False, calib_ids=calib(6), batch_size=2)
    assert run_ranks(quantize_in_memory, 2, config, 6, 2, tmp_path) == [0, 0]  # 3 batches: 2 + 1
    a, b = (torch.load(tmp_path / f"rank{r}.pt")["tensors"] for r in range(2))
    assert_same_tensors(a, b)
    scales = [k for k in a if k.endswith("scales")]
    for k in scales:
        torch.testing.assert_close(a[k].float(), _tensors(one)[k].float(), rtol=2e-2, atol=1e-3)


def test_more_ranks_than_calibration_batches_is_refused():
    with pytest.raises(ValueError, match="3 ranks need at least 3 calibration batches.*make 2"):
        quantize_gptq(tiny_model(), gptq(calib_samples=4), progress=False, calib_ids=calib(4), batch_size=2,
                      ranks=Ranks(rank=0, world=3))


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("src") / "tiny4"
    tiny_model(num_hidden_layers=4).save_pretrained(folder)
    return folder


def test_a_lost_rank_is_named_and_the_same_command_resumes(source, tmp_path):
    config = gptq(calib_samples=8, true_sequential=True)
    torch.set_num_threads(1)
    try:
        whole = quantize_gptq_streaming(source, config, calib(8), tmp_path / "whole", progress=False, batch_size=2)
    finally:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))

    out = tmp_path / "two"
    codes = run_ranks(quantize_streaming, 2, source, config, 8, 2, out, 2, timeout_s=240)
    assert codes == [2, 9] or codes == [2, -9]
    error = Path(f"{out}.rank0.error").read_text()
    assert error.startswith("RankLost: rank 0 lost rank 1 while") and "run the same command again" in error
    partial = Path(f"{out}.partial")
    assert not out.exists()
    assert json.loads((partial / "progress.json").read_text())["layers_done"] == 2
    assert sorted(p.name for p in partial.glob("layer-*")) == ["layer-00000.safetensors", "layer-00001.safetensors"]

    assert run_ranks(quantize_streaming, 2, source, config, 8, 2, out, None) == [0, 0]
    assert not partial.exists()
    logs = [json.loads((folder / "gptq_log.json").read_text()) for folder in (whole, out)]
    assert [e["loss"] for e in logs[0]] == [e["loss"] for e in logs[1]]
    assert_same_tensors(folder_tensors(whole), folder_tensors(out))


def test_the_command_line_starts_its_ranks_and_matches_one_process(tiny_folder, tmp_path):
    text = tiny_folder.parent / "text.txt"
    common = ["quantize", "--model", str(tiny_folder), "--method", "gptq", "--bits", "3", "--group-size", "32",
              "--calib-samples", "16", "--seq-len", "64", "--text-file", str(text), "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "bitcliff", *common, "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, env=env, timeout=300, check=False)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "bitcliff", *common, "--nproc", "2", "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, env=env, timeout=300, check=False)
    assert two.returncode == 0, two.stderr
    assert "on 2 ranks" in two.stdout
    assert_same_tensors(folder_tensors(tmp_path / "one"), folder_tensors(tmp_path / "two"))


@pytest.mark.parametrize("extra, message", [
    (["--nproc", "0"], "argument --nproc: must be a positive integer, got '0'"),
    (["--nproc", "2", "--method", "rtn"], "RTN needs none"),
    (["--nproc", "2", "--method", "gptq", "--rank-timeout", "0"],
     "argument --rank-timeout: must be a finite number above 0, got '0'"),
])
def test_bad_rank_options_are_refused_before_any_work(tiny_folder, tmp_path, extra, message, capsys):
    from bitcliff.cli import main

    args = ["quantize", "--model", str(tiny_folder), "--bits", "3", "--out", str(tmp_path / "q"), *extra]
    try:
        code = main(args)
    except SystemExit as exit_:  # refused as the command line is read
        code = exit_.code
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "q").exists()


def test_the_repair_walk_on_two_ranks_makes_the_one_process_repair(tmp_path):
    from rank_workers import repair_tiny
    from repair_fixtures import repair_setup

    import bitcliff
    from bitcliff.diagnosis.run import DiagnoseOptions

    fp, q, calib = repair_setup()
    evaluation = torch.randint(0, 128, (6, 32), generator=torch.Generator().manual_seed(2))
    report = bitcliff.diagnose(fp, q, evaluation, options=DiagnoseOptions.fast(), progress=False)
    plan = bitcliff.plan_repair(report, budget=1.0, methods=["restore", "norm", "lowrank", "bias"])
    assert plan.restore and plan.lowrank_bits and plan.bias_families and plan.norm
    torch.set_num_threads(1)
    try:
        one = bitcliff.repair(fp, q, calib, plan, batch_size=2, progress=False)
    finally:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))
    assert run_ranks(repair_tiny, 2, plan, tmp_path) == [0, 0]
    for rank in range(2):
        saved = torch.load(tmp_path / f"repair{rank}.pt")
        assert saved["bits"] == one.record.bits
        state = q.state_dict()
        assert saved["state"].keys() == state.keys()
        for key, value in state.items():
            torch.testing.assert_close(saved["state"][key], value, rtol=1e-5, atol=1e-6, msg=key)
