"""CPU benchmarks of the reference paths (pytest-benchmark).

    pytest bench/test_cpu_bench.py --benchmark-enable     # time them
    pytest bench/test_cpu_bench.py                        # --benchmark-disable (the default): run once as tests

Shapes are SmolLM2-135M's (hidden 576, MLP 1536), the model the CPU path serves.
"""

from __future__ import annotations

import json

import pytest
import torch

from bitcliff import QuantConfig
from bitcliff.kernels import reference
from bitcliff.kernels.layout import from_gptq, to_gptq
from bitcliff.kernels.pack import pack_qweight, unpack_qweight
from bitcliff.quant.qlinear import QuantLinear
from bitcliff.quant.rtn import quantize_rtn

K, N = 576, 1536


@pytest.fixture(scope="module", params=[2, 3, 4], ids=lambda b: f"w{b}")
def layer(request):
    torch.manual_seed(request.param)
    qw = quantize_rtn(torch.randn(N, K) * 0.02, QuantConfig(bits=request.param, group_size=128))
    return QuantLinear.from_quantized(qw, 128, torch.randn(N), "mlp.up_proj")


def test_pack_unpack(benchmark, layer):
    codes = unpack_qweight(layer.qweight, layer.bits, K)

    def roundtrip():
        return unpack_qweight(pack_qweight(codes, layer.bits), layer.bits, K)

    assert torch.equal(benchmark(roundtrip), codes)


def test_kernel_layout_repack(benchmark, layer):
    layout = benchmark(from_gptq, layer.qweight, layer.qzeros, layer.scales, layer.g_idx, layer.bits)
    assert torch.equal(to_gptq(layout)["qweight"], layer.qweight)


@pytest.mark.parametrize("m", [1, 64])
def test_reference_dequant_matmul(benchmark, layer, m):
    x = torch.randn(m, K)
    y = benchmark(reference.dequant_matmul, x, layer.qweight, layer.qzeros, layer.scales,
                  layer.g_idx, layer.bits, layer.bias)
    assert y.shape == (m, N) and torch.isfinite(y).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_quantlinear_forward(benchmark, layer, dtype):
    x = torch.randn(1, 8, K, dtype=dtype)
    with torch.inference_mode():
        y = benchmark(layer, x)
    assert y.shape == (1, 8, N) and y.dtype == dtype


@pytest.mark.parametrize("bits,design,ours", [(4, 3.76, 3.82), (3, 4.92, 5.01), (2, 7.11, 7.29)])
def test_ideal_speedup_accounting(bits, design, ours):
    """The benchmark's byte accounting reproduces the usual count (fp16 zero) and our uint8-zero layout."""
    from bench.kernels import ideal

    qw = quantize_rtn(torch.randn(64, 256), QuantConfig(bits=bits, group_size=128))
    small = from_gptq(**qw.packed(), bits=bits)
    k = n = 4096  # scale the small layout's per-weight bytes up to a Llama-3-8B layer
    layout_bytes = small.nbytes() * (k * n) // (256 * 64)
    got = ideal(k, n, 1, bits, 128, layout_bytes)
    assert got["ideal_speedup_design"] == pytest.approx(design, rel=5e-3)
    assert got["ideal_speedup_bytes"] == pytest.approx(ours, rel=5e-3)


def test_the_cpu_kernel_benchmark_writes_its_rows_and_resumes(tmp_path):
    from bench import cpu_kernels

    out = tmp_path / "rows.jsonl"
    argv = ["--shapes", "smollm2", "--rows", "1", "17", "--bits", "3", "--groups", "64", "--threads", "1",
            "--reps", "1", "--rotate-mb", "1", "--bf16-max-rows", "1", "--out", str(out)]
    assert cpu_kernels.main(argv) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    measured = [r for r in rows if "variant" in r]
    # 3 shapes x (fp32, w3g64 at both row counts, bf16 at one row)
    assert len(measured) == 3 * (2 * 2 + 1)
    for r in measured:
        assert r["seconds"] > 0 and 0 < r["fraction_of_floor"] and r["tokens_per_s"] == r["rows"] / r["seconds"]
        if r["variant"] == "w3g64":
            assert r["speedup_vs_fp32"] > 0 and r["bits_per_weight"] < 4.5
    assert cpu_kernels.main(argv) == 0  # a rerun measures nothing again
    again = [json.loads(line) for line in out.read_text().splitlines()]
    assert len([r for r in again if "variant" in r]) == len(measured)


def test_the_peer_gets_the_same_weights():
    from bench.cpu_kernels import _torch_int4, quantized_layer

    weight = torch.randn(96, 256) * 0.02
    packed, scales_and_zeros = _torch_int4(weight, 64)
    x = torch.randn(3, 256)
    peer = torch._weight_int4pack_mm_for_cpu(x.bfloat16(), packed, 64, scales_and_zeros).float()
    ours = x @ quantized_layer(weight, 4, 64).dequantize().t()
    assert (peer - ours).norm() / ours.norm() < 2e-2  # bf16 activations and scales


def test_the_cpu_table_shows_each_variant_beside_fp32(tmp_path):
    from bench.cpu_table import load_rows, table

    rows_file = tmp_path / "rows.jsonl"
    rows = [{"environment": {"read_bandwidth_gbs": {"2": 20.0}}},
            {"shape": "a 8x8", "rows": 1, "threads": 2, "variant": "fp32", "seconds": 2e-3, "fraction_of_floor": 0.8},
            {"shape": "a 8x8", "rows": 1, "threads": 2, "variant": "w4g128", "seconds": 5e-4,
             "fraction_of_floor": 0.5, "speedup_vs_fp32": 4.0}]
    rows_file.write_text("\n".join(json.dumps(r) for r in rows))
    environment, measured = load_rows(rows_file)
    assert environment["read_bandwidth_gbs"]["2"] == 20.0 and len(measured) == 2
    text = table(measured, 1, 2, 128)
    assert "| a 8x8 | 2 ms (1.00x, 80%) | 0.5 ms (4.00x, 50%) |" in text


def test_decode_speed_leaves_out_the_prompts_prefill():
    from transformers import LlamaConfig, LlamaForCausalLM

    from bench.decode import time_generate

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=128)).eval()
    prompt = torch.randint(0, 128, (1, 8))
    row = time_generate(model, prompt, new_tokens=4, reps=1, static=False)
    assert row["seconds"] > row["first_token_seconds"] > 0
    assert row["tokens_per_s"] == pytest.approx(3 / (row["seconds"] - row["first_token_seconds"]))
    assert row["generate_tokens_per_s"] == pytest.approx(4 / row["seconds"])
    with pytest.raises(ValueError, match="--new-tokens"):
        time_generate(model, prompt, new_tokens=1, reps=1, static=False)
