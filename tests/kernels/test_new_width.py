"""Bit width is data: a width bitcliff does not ship (5 bits, planes 4 + 1) works once it is added
to ``pack.SUPPORTED_BITS``: packing, the kernel layout, the GPU decode (bit for bit), the kernels."""

from __future__ import annotations

import pytest
import test_decode
import test_qmatmul
import torch

from bitcliff.kernels import layout, pack, reference
from bitcliff.kernels.pack import default_g_idx, pack_qweight, pack_qzeros

pytestmark = pytest.mark.interpret


@pytest.fixture
def five_bits(monkeypatch):
    widths = (*pack.SUPPORTED_BITS, 5)
    monkeypatch.setattr(pack, "SUPPORTED_BITS", widths)
    monkeypatch.setattr(layout, "SUPPORTED_BITS", widths)


def test_the_width_spec_and_the_layout(five_bits):
    assert layout.width(5).planes == (4, 1) and layout.width(5).hi == 1
    gen = torch.Generator().manual_seed(5)
    codes = torch.randint(0, 32, (96, 40), generator=gen, dtype=torch.int32)
    zeros = torch.randint(0, 32, (3, 40), generator=gen, dtype=torch.int32)
    tensors = {"qweight": pack_qweight(codes, 5), "qzeros": pack_qzeros(zeros, 5),
               "scales": (torch.rand(3, 40, generator=gen) + 0.5).half(), "g_idx": default_g_idx(96, 32)}
    kl = layout.from_gptq(**tensors, bits=5)
    back = layout.to_gptq(kl)
    assert all(torch.equal(back[key], tensors[key]) for key in tensors)
    assert torch.equal(kl.dequantize(), reference.dequantize(**tensors, bits=5))


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_the_decode_programs_are_exact(five_bits, dtype):
    test_decode.test_every_pair_decodes_exactly(5, dtype)
    test_decode.test_word_program_gives_scaled_weights_in_k_order(5, dtype)
    test_decode.test_half_precision_sums_stay_within_the_kernel_tolerance(5, dtype)


@pytest.mark.parametrize("schedule,capture", [("gemv", "error"), ("tiled", "stats"), ("dequant", "none")])
def test_the_kernels(five_bits, kernels, device, schedule, capture):
    test_qmatmul.run_case(kernels, device, bits=5, group_size=32, k=96, m=3, dtype=torch.float16,
                          schedule=schedule, capture=capture, seed=5)
