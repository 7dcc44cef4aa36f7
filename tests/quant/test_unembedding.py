"""The unembedding's bf16 decode: the kernel against float64 on awkward shapes, and the module
keeps the model's parameters, ties and full-precision prefill."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bitcliff.kernels.cpu_build import native_ops
from bitcliff.quant.unembedding import DECODE_MAX_ROWS, DecodeUnembedding, read_unembedding_in_bf16

ops = native_ops()
pytestmark = pytest.mark.skipif(ops is None, reason="the compiled CPU kernel did not build here")


def _bound(x: torch.Tensor, weight: torch.Tensor) -> float:
    """fp32 summation error bound: K * eps * sum |x||w|, as a scalar over all outputs."""
    return float(x.shape[-1] * 2**-23 * (x.abs().double() @ weight.abs().double().T).max()) + 1e-30


@pytest.mark.parametrize("rows", [1, 2, 3, 5])
@pytest.mark.parametrize(("n", "k"), [(1, 1), (37, 19), (9, 16), (130, 581), (6, 4096)])
def test_kernel_equals_float64_products_of_the_bf16_weights(rows, n, k):
    gen = torch.Generator().manual_seed(n * 1000 + k + rows)
    weight = torch.randn(n, k, generator=gen).to(torch.bfloat16)
    x = torch.randn(rows, k, generator=gen) * 3
    exact = x.double() @ weight.double().T
    y = ops.linear_bf16(x, weight)
    assert y.dtype == torch.float32 and y.shape == (rows, n)
    assert (y.double() - exact).abs().max() <= _bound(x, weight.float())


def test_kernel_keeps_leading_dimensions_and_refuses_bad_inputs():
    weight = torch.randn(7, 24).to(torch.bfloat16)
    assert ops.linear_bf16(torch.randn(1, 1, 24), weight).shape == (1, 1, 7)
    with pytest.raises(RuntimeError, match="bf16"):
        ops.linear_bf16(torch.randn(1, 24), weight.float())
    with pytest.raises(RuntimeError, match=r"x must be \[..., 24\]"):
        ops.linear_bf16(torch.randn(1, 23), weight)


def _tied_model():
    from transformers import LlamaForCausalLM

    from tests.conftest import tiny_llama_config

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config()).eval()


def test_module_keeps_the_tied_parameter_and_the_state_dict():
    model = _tied_model()
    keys = list(model.state_dict())
    assert read_unembedding_in_bf16(model)
    head = model.get_output_embeddings()
    assert isinstance(head, DecodeUnembedding)
    assert head.weight is model.get_input_embeddings().weight
    assert list(model.state_dict()) == keys


def test_decode_reads_bf16_and_prefill_the_fp32_weight():
    model = _tied_model()
    weight = model.get_output_embeddings().weight.detach().clone()
    read_unembedding_in_bf16(model)
    head = model.get_output_embeddings()
    with torch.inference_mode():
        few = torch.randn(1, DECODE_MAX_ROWS, weight.shape[1])
        rounded = F.linear(few.double(), weight.to(torch.bfloat16).double())
        assert (head(few).double() - rounded).abs().max() <= _bound(few, weight)
        assert not torch.equal(head(few), F.linear(few, weight))  # the copy, not the fp32 weight
        many = torch.randn(1, DECODE_MAX_ROWS + 1, weight.shape[1])
        assert torch.equal(head(many), F.linear(many, weight))


def test_a_model_reading_it_deep_copies_and_keeps_its_tie():
    import copy

    model = _tied_model()
    read_unembedding_in_bf16(model)
    twin = copy.deepcopy(model)
    head = twin.get_output_embeddings()
    assert isinstance(head, DecodeUnembedding) and head.weight is twin.get_input_embeddings().weight
    x = torch.randn(1, head.in_features)
    with torch.inference_mode():
        assert torch.equal(head(x), model.get_output_embeddings()(x))


def test_a_changed_weight_is_copied_again():
    model = _tied_model()
    read_unembedding_in_bf16(model)
    head = model.get_output_embeddings()
    x = torch.randn(1, head.in_features)
    with torch.inference_mode():
        before = head(x)
    with torch.no_grad():
        head.weight.mul_(2)
    with torch.inference_mode():
        assert torch.allclose(head(x), 2 * before, rtol=1e-5, atol=1e-6)


def test_gradients_take_the_fp32_path():
    model = _tied_model()
    read_unembedding_in_bf16(model)
    head = model.get_output_embeddings()
    x = torch.randn(1, head.in_features, requires_grad=True)
    head(x).sum().backward()
    assert torch.allclose(x.grad, head.weight.detach().sum(0))


def test_only_fp32_cpu_linears_are_replaced():
    model = _tied_model().to(torch.bfloat16)
    assert not read_unembedding_in_bf16(model)
    assert type(model.get_output_embeddings()) is nn.Linear


def test_load_reads_the_unembedding_in_bf16_unless_asked_not_to(tmp_path):
    import bitcliff

    model = bitcliff.quantize(_tied_model(), bitcliff.QuantConfig(bits=4, group_size=32), progress=False)
    bitcliff.save(model, tmp_path / "q")
    assert isinstance(bitcliff.load(tmp_path / "q").get_output_embeddings(), DecodeUnembedding)
    assert type(bitcliff.load(tmp_path / "q", bf16_unembedding=False).get_output_embeddings()) is nn.Linear
