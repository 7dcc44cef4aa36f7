"""Capture sessions: attach to every QuantLinear by name, always detach, record the right numbers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bitcliff import QuantConfig, quantize
from bitcliff.diagnosis.capture import CaptureSession, LayerCapture
from bitcliff.kernels import reference
from bitcliff.quant.qlinear import QuantLinear


@pytest.fixture
def quantized(tiny_llama):
    """(model, fp weights by name) for a tiny Llama quantized W3 g32."""
    fp = {name: m.weight.detach().clone() for name, m in tiny_llama.named_modules()
          if type(m) is nn.Linear and "lm_head" not in name}
    quantize(tiny_llama, QuantConfig(bits=3, group_size=32), progress=False)
    return tiny_llama, fp


def qlinears(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}


def record_io(model):
    """Forward hooks recording each QuantLinear's input and output (the direct computation)."""
    seen, handles = {}, []
    for name, module in qlinears(model).items():
        def hook(mod, args, out, name=name):
            seen.setdefault(name, []).append((args[0].detach(), out.detach()))
        handles.append(module.register_forward_hook(hook))
    return seen, handles


def test_attaches_to_every_quantlinear_and_detaches(quantized):
    model, _ = quantized
    layers = qlinears(model)
    with CaptureSession(model, mode="stats") as session:
        assert set(session.layers) == set(layers) and len(layers) == 14
        assert all(isinstance(m.capture, LayerCapture) and m.capture.name == n for n, m in layers.items())
    assert all(m.capture is None for m in layers.values())
    assert not session.attached


def test_detaches_when_the_body_raises(quantized):
    model, _ = quantized
    with pytest.raises(RuntimeError, match="boom"):
        with CaptureSession(model, mode="stats"):
            model(torch.randint(0, 128, (1, 4)))
            raise RuntimeError("boom")
    assert all(m.capture is None for m in qlinears(model).values())


def test_a_second_session_is_refused_and_leaves_the_first_attached(quantized):
    model, _ = quantized
    with CaptureSession(model, mode="stats", modules=["*.mlp.*"]) as first:
        with pytest.raises(RuntimeError, match="already attached"):
            CaptureSession(model, mode="stats").__enter__()
        mlp = [m for n, m in qlinears(model).items() if ".mlp." in n]
        attn = [m for n, m in qlinears(model).items() if ".mlp." not in n]
        assert all(m.capture is not None and m.capture.sink == first._sink for m in mlp)
        assert all(m.capture is None for m in attn)
    assert all(m.capture is None for m in qlinears(model).values())


def test_stats_match_direct_computation(quantized):
    model, _ = quantized
    seen, handles = record_io(model)
    ids = torch.randint(0, 128, (2, 7))
    try:
        with CaptureSession(model, mode="stats") as session:
            model(ids)
            model(ids[:, :3])
    finally:
        for h in handles:
            h.remove()
    records = session.records
    assert set(records) == set(qlinears(model))
    for name, calls in seen.items():
        y = torch.cat([out.reshape(-1, out.shape[-1]) for _, out in calls])
        direct = reference.output_stats(y)
        assert records[name]["sq_norm"].shape == (2 * 7 + 2 * 3,)
        torch.testing.assert_close(records[name]["sq_norm"], direct["sq_norm"], rtol=1e-6, atol=0)
        torch.testing.assert_close(records[name]["abs_max"], direct["abs_max"], rtol=0, atol=0)


def test_error_matches_direct_computation(quantized):
    model, fp = quantized
    seen, handles = record_io(model)
    try:
        with CaptureSession(model, mode="error", fp_weights=fp) as session:
            model(torch.randint(0, 128, (2, 5)))
    finally:
        for h in handles:
            h.remove()
    layers = qlinears(model)
    for name, calls in seen.items():
        (x, y), = calls
        xf = x.reshape(-1, x.shape[-1]).double()
        b = 0 if layers[name].bias is None else layers[name].bias.double()
        y_fp = xf @ fp[name].double().t() + b
        y_q = xf @ layers[name].dequantize().double().t() + b
        rec = session.records[name]
        torch.testing.assert_close(rec["fp_sq"].double(), (y_fp**2).sum(1), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(rec["err_sq"].double(), ((y_q - y_fp) ** 2).sum(1), rtol=1e-3, atol=1e-7)
        assert (rec["err_sq"] > 0).all()
    rows = session.summary()
    assert [r["module"] for r in rows] == list(layers)
    assert all(0 < r["rel_err_total"] < 1 and r["tokens"] == 10 for r in rows)
    assert "rel_err_total" in session.table()


def test_aggregate_mode_matches_records(quantized):
    model, fp = quantized
    ids = torch.randint(0, 128, (2, 6))
    with CaptureSession(model, mode="error", fp_weights=fp) as full:
        model(ids)
    with CaptureSession(model, mode="error", fp_weights=fp, keep="aggregate") as agg:
        model(ids)
    for a, b in zip(full.summary(), agg.summary()):
        assert a.keys() == b.keys()
        for key in a:
            if key != "module":
                assert a[key] == pytest.approx(b[key], rel=1e-5)
    with pytest.raises(ValueError, match="aggregate"):
        agg.records


def test_bad_arguments_are_named(quantized):
    model, fp = quantized
    with pytest.raises(ValueError, match="mode"):
        CaptureSession(model, mode="everything")
    missing = dict(fp)
    name = sorted(missing)[0]
    del missing[name]
    with pytest.raises(ValueError, match="missing.*" + name.replace(".", r"\.")):
        CaptureSession(model, mode="error", fp_weights=missing)
    wrong = dict(fp, **{name: fp[name].t()})
    with pytest.raises(ValueError, match="shape"):
        CaptureSession(model, mode="error", fp_weights=wrong)
    with pytest.raises(ValueError, match="no QuantLinear"):
        CaptureSession(model, modules=["nothing.*"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the fused kernel capture)")
def test_cuda_capture_matches_cpu_reference(quantized):
    model, fp = quantized
    ids = torch.randint(0, 128, (2, 9))
    with CaptureSession(model, mode="error", fp_weights=fp) as cpu:
        model(ids)
    model = model.cuda().half()
    fp16 = {k: v.cuda().half() for k, v in fp.items()}
    with CaptureSession(model, mode="error", fp_weights=fp16) as gpu:
        model(ids.cuda())
    for name, rec in cpu.records.items():
        got = gpu.records[name]
        torch.testing.assert_close(got["fp_sq"].cpu(), rec["fp_sq"], rtol=2e-2, atol=1e-3)
        # Relative error per token agrees to the fp16 rounding of the layer input.
        rel_cpu = (rec["err_sq"] / rec["fp_sq"]).sqrt()
        rel_gpu = (got["err_sq"] / got["fp_sq"]).sqrt().cpu()
        assert ((rel_gpu - rel_cpu).abs() < 0.02 + 0.1 * rel_cpu).all()
