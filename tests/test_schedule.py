"""The main job's step schedule: needs before steps, longest chains first, workers in parallel."""

from __future__ import annotations

import os

import pytest
import torch

from bitcliff.cliff.schedule import Step, order, run_steps, worker_count


def _job():
    return [Step("rtn"), Step("gptq"), Step("diagnosis", ("gptq",)), Step("repair", ("fp", "gptq", "diagnosis"))]


def test_chains_count_the_steps_that_follow():
    chains = {s.name: s.chain for s in order(_job(), {"fp": {}})}
    assert chains == {"rtn": 1, "gptq": 3, "diagnosis": 2, "repair": 1}


def test_a_need_that_is_neither_a_step_nor_done_is_refused():
    with pytest.raises(ValueError, match="repair needs fp"):
        order(_job(), {})


def test_one_worker_runs_the_steps_in_order_each_after_its_needs():
    seen = []

    def compute(name, done):
        seen.append(name)
        assert all(n in done for s in _job() if s.name == name for n in s.needs)
        return {"value": len(seen)}

    done = {"fp": {}, "rtn": {"value": 0}}
    recorded = []
    run_steps(_job(), done, compute, lambda name, result: recorded.append(name))
    assert seen == recorded == ["gptq", "diagnosis", "repair"]  # rtn was done already


def worker_compute(name, done):
    """Module level, so a spawned worker can import it: the needs it was given, and its pid."""
    return {"needs": sorted(done), "pid": os.getpid(), "threads": torch.get_num_threads()}


def test_two_workers_get_each_step_with_its_needs_and_their_threads():
    done = {"fp": {"ppl": 1.0}}
    run_steps(_job(), done, worker_compute, lambda name, result: None, workers=2, threads=1)
    assert done["repair"]["needs"] == ["diagnosis", "fp", "gptq"]
    assert done["diagnosis"]["needs"] == ["gptq"] and done["rtn"]["needs"] == []
    assert os.getpid() not in {done[s.name]["pid"] for s in _job()}
    assert {done[s.name]["threads"] for s in _job()} == {1}


def test_worker_count_is_one_on_a_gpu_or_a_single_core():
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert worker_count(cpu, 12, cores=2) == 2
    assert worker_count(cpu, 12, cores=1) == 1
    assert worker_count(gpu, 12, cores=16) == 1
    assert worker_count(cpu, 1, cores=16) == 1
