"""The engine on a GPU: quantize, evaluate, diagnose, repair and the main job's steps run there,
through the Triton kernels, and agree with the CPU within the stated tolerances.

Marked ``cuda``: skipped where there is no GPU, run by ``bench/gpu_check.sh`` on one.  Tolerances
(``docs/architecture.md``, section 4): the GPU computes in half precision, so its numbers are
not the CPU's fp32 ones bit for bit; perplexities agree within 1 % at W4 and W3, and the verdict
is the same.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch

import bitcliff
from bitcliff.device import compute_dtype, resolve_device
from bitcliff.diagnosis.run import DiagnoseOptions
from bitcliff.eval import evaluate_ppl
from bitcliff.kernels.layout import KernelLayout
from bitcliff.quant.checkpoint import QUANT_KEYS
from bitcliff.quant.config import QuantConfig
from bitcliff.quant.qlinear import QuantLinear
from bitcliff.repairs.run import diagnose_and_repair

pytestmark = [pytest.mark.cuda, pytest.mark.filterwarnings("ignore::RuntimeWarning")]

WINDOWS = torch.randint(0, 128, (16, 64), generator=torch.Generator().manual_seed(0))
EXAMPLES = torch.randint(0, 128, (6, 64), generator=torch.Generator().manual_seed(1))


def _on(model, device):
    return model.to(device=device, dtype=compute_dtype(device)).eval()


@pytest.mark.parametrize("bits", [4, 3])
def test_gptq_evaluate_diagnose_repair_agree_with_the_cpu(tiny_llama, bits):
    device = resolve_device("cuda")
    config = QuantConfig(method="gptq", bits=bits, group_size=32, calib_samples=16)
    results = {}
    for where in (torch.device("cpu"), device):
        fp = _on(copy.deepcopy(tiny_llama), where)
        quantized = bitcliff.quantize(copy.deepcopy(fp), config, progress=False, calib_ids=WINDOWS)
        if where.type == "cuda":
            layer = next(m for m in quantized.modules() if isinstance(m, QuantLinear))
            assert layer.qweight.is_cuda and isinstance(layer.kernel_layout(), KernelLayout)  # the Triton path
        report = bitcliff.diagnose(fp, quantized, EXAMPLES, progress=False,
                                   options=DiagnoseOptions(trace_examples=2, patch_examples=1, capture_examples=1))
        outcome = diagnose_and_repair(fp, quantized, WINDOWS, 0.5, diagnosis=report.to_dict(), eval_ids=WINDOWS,
                                      plan_options={"methods": ["lowrank", "bias"]})
        results[where.type] = (evaluate_ppl(fp, WINDOWS, progress=False)["ppl"], outcome.ppl, report.verdict.label)
    (fp_cpu, ppl_cpu, verdict_cpu), (fp_gpu, ppl_gpu, verdict_gpu) = results["cpu"], results["cuda"]
    assert fp_gpu == pytest.approx(fp_cpu, rel=0.01)
    for key in ("quantized", "repaired"):
        assert ppl_gpu[key] == pytest.approx(ppl_cpu[key], rel=0.01), key
    assert verdict_gpu == verdict_cpu


def test_the_main_job_runs_on_the_gpu(tiny_folder, tmp_path):
    from bitcliff.cli import main

    out = tmp_path / "cliff"
    assert main(["cliff", "--model", str(tiny_folder), "--text-file", str(tiny_folder.parent / "text.txt"),
                 "--windows", "2", "--calib-samples", "4", "--repair-calib", "4", "--diagnosis-examples", "4",
                 "--trace-examples", "2", "--group-size", "32", "--device", "cuda", "--out", str(out)]) == 0
    summary = json.loads((out / "cliff.json").read_text())
    assert summary["device"].startswith("cuda") and summary["dtype"] == "torch.float16"
    state = json.loads((out / "state.json").read_text())
    assert all(step["peak_gpu_gib"] > 0 for step in state["steps"].values())


def _quantize(tiny_folder, out, *extra):
    command = [sys.executable, "-m", "bitcliff", "quantize", "--model", str(tiny_folder), "--method", "gptq",
               "--bits", "3", "--group-size", "32", "--calib-samples", "16", "--seq-len", "64", "--text-file",
               str(tiny_folder.parent / "text.txt"), "--device", "cuda", "--out", str(out), *extra]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    assert "peak" in done.stdout and "GiB allocated" in done.stdout
    return out


def _quantized_tensors(folder) -> dict[str, torch.Tensor]:
    """The packed tensors (the rest is stored in the model's dtype, which the two paths may differ in)."""
    from safetensors.torch import load_file

    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update({k: v for k, v in load_file(path).items() if k.rpartition(".")[2] in QUANT_KEYS})
    return tensors


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and a
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def test_streaming_on_the_gpu_equals_in_memory(tiny_folder, tmp_path):
    _assert_same(_quantized_tensors(_quantize(tiny_folder, tmp_path / "memory")),
                 _quantized_tensors(_quantize(tiny_folder, tmp_path / "stream", "--streaming")))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="two nccl ranks need two GPUs")
def test_two_nccl_ranks_give_the_one_rank_checkpoint(tiny_folder, tmp_path):
    _assert_same(_quantized_tensors(_quantize(tiny_folder, tmp_path / "one")),
                 _quantized_tensors(_quantize(tiny_folder, tmp_path / "two", "--nproc", "2")))
