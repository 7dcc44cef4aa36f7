"""The engine computes where the model is: it makes no tensor on torch's default device.

A CPU run cannot show a tensor left on the wrong device, since there is only one.  Setting torch's
default device to ``meta`` makes one: the model and the inputs are made on the CPU first, so any
tensor the engine creates without naming a device lands on ``meta``, and mixing it with the
model's tensors, or reading it, raises.  That is the mistake that breaks a run on a GPU (a mean on
the host multiplied by a scale on the device) and the one that breaks a user who sets
``torch.set_default_device("cuda")``; the ``cuda`` tests run the same steps on a real GPU.
"""

from __future__ import annotations

import copy

import pytest
import torch

import bitcliff
from bitcliff.diagnosis.run import DiagnoseOptions
from bitcliff.eval import evaluate_ppl
from bitcliff.quant.config import QuantConfig
from bitcliff.repairs.plan import method_names
from bitcliff.repairs.run import diagnose_and_repair

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

WINDOWS = torch.randint(0, 128, (8, 24), generator=torch.Generator().manual_seed(0))
EXAMPLES = torch.randint(0, 128, (6, 24), generator=torch.Generator().manual_seed(1))


def elsewhere():
    """Torch's default device set to one the model is not on."""
    return torch.device("meta")


@pytest.mark.parametrize("config", [
    QuantConfig(bits=3, group_size=32),
    QuantConfig(method="gptq", bits=3, group_size=32, calib_samples=8, act_order=True, mse=True),
    QuantConfig(method="gptq", bits=4, group_size=32, calib_samples=8, static_groups=True, act_order=True,
                refit_rounds=2),
    QuantConfig.paper_gptq(bits=2, group_size=-1, calib_samples=8),
], ids=["rtn", "gptq-act-order-mse", "gptq-static-refit2", "gptq-paper-per-channel"])
def test_quantize_save_load_evaluate(config, tiny_llama, tmp_path):
    model = tiny_llama
    reference = evaluate_ppl(bitcliff.quantize(copy.deepcopy(model), config, progress=False, calib_ids=WINDOWS),
                             WINDOWS, progress=False)["ppl"]
    with elsewhere():
        quantized = bitcliff.quantize(model, config, progress=False, calib_ids=WINDOWS)
        bitcliff.save(quantized, tmp_path / "q")
        ppl = evaluate_ppl(bitcliff.load(tmp_path / "q"), WINDOWS, progress=False)["ppl"]
    assert ppl == pytest.approx(reference, rel=1e-5)


def test_diagnose_and_every_repair(tiny_llama):
    fp = tiny_llama
    quantized = bitcliff.quantize(copy.deepcopy(fp), QuantConfig(bits=2, group_size=32), progress=False)
    options = DiagnoseOptions(trace_examples=2, patch_examples=2, capture_examples=1)
    with elsewhere():
        report = bitcliff.diagnose(fp, quantized, EXAMPLES, options=options, progress=False)
        outcome = diagnose_and_repair(fp, quantized, WINDOWS, 2.0, diagnosis=report.to_dict(), eval_ids=EXAMPLES,
                                      plan_options={"methods": list(method_names())})
    assert report.verdict.label
    assert set(outcome.plan.methods) == set(method_names())
    assert outcome.ppl["repaired"] < outcome.ppl["quantized"]
