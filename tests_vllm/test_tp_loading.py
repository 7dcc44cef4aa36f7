"""Tensor-parallel loading through vLLM's own parameter classes, two ranks simulated in one process.

Each rank's layer is created by the plugin's ``create_weights`` with that rank's sizes, and every
checkpoint tensor is handed to the parameter loader a vLLM linear layer calls
(``load_row_parallel_weight``, ``load_qkv_weight``, ``load_merged_column_weight``), so vLLM's slicing
of the packed tensors (3-bit words included) meets the plugin's layouts.  What this leaves out: the
processes, the all-reduce and the layers' own offset arithmetic, mirrored here from vLLM's linear.py.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bitcliff.kernels.cpu_packed import INT_MAX_ROWS
from bitcliff.kernels.pack import pack_qweight, pack_qzeros

pytest.importorskip("vllm", reason="needs vLLM (make test-vllm installs it)")

TP = 2
#: Rows per product: more than the compiled kernel's integer decode takes.
ROWS = INT_MAX_ROWS + 1


@pytest.fixture(autouse=True)
def _fp32_activations():
    """Every product here with fp32 activations, so that a layer equals its dense weight up to fp32
    summation order (the kernel's integer products are tested in tests/kernels/test_cpu.py)."""
    from bitcliff.kernels.cpu import exact_activations

    with exact_activations():
        yield


@pytest.fixture
def ranks(monkeypatch):
    """Set the tensor-parallel rank the parameters see (vLLM reads it when they are created)."""
    import vllm.model_executor.parameter as parameter

    def set_rank(rank):
        monkeypatch.setattr(parameter, "get_tensor_model_parallel_rank", lambda: rank)
        monkeypatch.setattr(parameter, "get_tensor_model_parallel_world_size", lambda: TP)

    return set_rank


def checkpoint_layer(k, sizes, bits, group_size, seed):
    """Stored tensors of each shard and the dense fp32 weight ``[N, K]`` of the fused layer (act-order)."""
    gen = torch.Generator().manual_seed(seed)
    shards, dense = [], []
    groups = -(-k // group_size)
    for n in sizes:
        codes = torch.randint(0, 2**bits, (k, n), generator=gen)
        zeros = torch.randint(0, 2**bits, (groups, n), generator=gen)
        scales = (torch.rand(groups, n, generator=gen) * 0.02 + 0.001).half()
        g_idx = (torch.arange(k) // group_size)[torch.randperm(k, generator=gen)].to(torch.int32)
        shards.append({"qweight": pack_qweight(codes, bits), "qzeros": pack_qzeros(zeros, bits),
                       "scales": scales, "g_idx": g_idx})
        dense.append((scales.float()[g_idx.long()] * (codes - zeros[g_idx.long()]).float()).t())
    return shards, torch.cat(dense)


def served_layer(bits, group_size, k_rank, k, sizes_rank, n):
    from bitcliff.serving.settings import LayerSettings
    from bitcliff.serving.vllm_config import BitcliffGPTQConfig
    from bitcliff.serving.vllm_method import BitcliffLinearMethod

    config = BitcliffGPTQConfig({"quant_method": "gptq", "bits": bits, "group_size": group_size, "sym": False,
                                 "desc_act": True, "checkpoint_format": "gptq_v2"})
    method = BitcliffLinearMethod(config, [LayerSettings(bits, group_size)] * len(sizes_rank), "layer",
                                  [f"part{i}" for i in range(len(sizes_rank))])
    layer = nn.Module()
    method.create_weights(layer, k_rank, list(sizes_rank), k, n, torch.float32, weight_loader=None)
    return method, layer


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_row_parallel_ranks_add_up_to_the_layer(ranks, bits):
    k, n = 512, 96
    (stored,), dense = checkpoint_layer(k, [n], bits, 64, seed=bits)
    x = torch.randn(ROWS, k)
    total = torch.zeros(ROWS, n)
    for rank in range(TP):
        ranks(rank)
        method, layer = served_layer(bits, 64, k // TP, k, [n], n)
        for name, tensor in stored.items():
            getattr(layer, name).load_row_parallel_weight(tensor)
        method.process_weights_after_loading(layer)
        part = slice(rank * k // TP, (rank + 1) * k // TP)
        total += method.apply(layer, x[:, part])
    torch.testing.assert_close(total, x @ dense.t(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_fused_qkv_ranks_hold_their_heads(ranks, bits):
    k, sizes = 256, (128, 64, 64)  # q, k, v; kv heads split over the two ranks
    shards, dense = checkpoint_layer(k, sizes, bits, 32, seed=10 + bits)
    x = torch.randn(ROWS, k)
    for rank in range(TP):
        ranks(rank)
        local = [s // TP for s in sizes]
        method, layer = served_layer(bits, 32, k, k, local, sum(sizes))
        for i, (shard_id, stored) in enumerate(zip("qkv", shards)):
            for name, tensor in stored.items():  # what QKVParallelLinear.weight_loader_v2 passes
                getattr(layer, name).load_qkv_weight(loaded_weight=tensor, num_heads=1, shard_id=shard_id,
                                                     shard_offset=sum(local[:i]), shard_size=local[i])
        method.process_weights_after_loading(layer)
        rows = torch.cat([torch.arange(sum(sizes[:i]) + rank * local[i], sum(sizes[:i]) + (rank + 1) * local[i])
                          for i in range(3)])
        torch.testing.assert_close(method.apply(layer, x), x @ dense[rows].t(), rtol=1e-4, atol=1e-4)


def test_merged_gate_up_with_one_rank(ranks):
    k, sizes, bits = 128, (96, 96), 3
    shards, dense = checkpoint_layer(k, sizes, bits, 64, seed=3)
    ranks(0)
    method, layer = served_layer(bits, 64, k, k, sizes, sum(sizes))
    for i, stored in enumerate(shards):
        for name, tensor in stored.items():
            getattr(layer, name).load_merged_column_weight(loaded_weight=tensor, shard_id=i,
                                                           shard_offset=sum(sizes[:i]), shard_size=sizes[i])
    method.process_weights_after_loading(layer)
    x = torch.randn(ROWS, k)
    torch.testing.assert_close(method.apply(layer, x), x @ dense.t(), rtol=1e-4, atol=1e-4)


def test_a_split_that_straddles_3bit_words_is_refused(ranks):
    ranks(0)
    with pytest.raises(ValueError, match="multiples of 32"):
        served_layer(3, 64, 576, 576, [48, 48], 192)  # 96 columns of v over 2 ranks: 48 each


def test_fused_shards_at_different_widths_hold_their_own_layouts(ranks):
    """q at 4 bits g128, k at 2 bits g32, v at 3 bits g64 (a repair restores one projection, or
    ``--avg-bits`` gives each its own): every shard is loaded apart and runs its own layout."""
    from bitcliff.serving.settings import LayerSettings
    from bitcliff.serving.vllm_config import BitcliffGPTQConfig
    from bitcliff.serving.vllm_method import BitcliffLinearMethod

    k, sizes = 256, (128, 64, 64)
    widths = [(4, 128), (2, 32), (3, 64)]
    shards, dense = [], []
    for i, (bits, group_size) in enumerate(widths):
        (stored,), part = checkpoint_layer(k, [sizes[i]], bits, group_size, seed=20 + i)
        shards.append(stored)
        dense.append(part)
    dense = torch.cat(dense)
    config = BitcliffGPTQConfig({"quant_method": "gptq", "bits": 3, "group_size": 64, "sym": False,
                                 "desc_act": True, "checkpoint_format": "gptq_v2"})
    x = torch.randn(ROWS, k)
    for rank in range(TP):
        ranks(rank)
        local = [s // TP for s in sizes]
        method = BitcliffLinearMethod(config, [LayerSettings(b, g) for b, g in widths], "qkv_proj", ["q", "k", "v"])
        layer = nn.Module()
        method.create_weights(layer, k, local, k, sum(sizes), torch.float32, weight_loader=None)
        for i, (shard_id, stored) in enumerate(zip("qkv", shards)):
            for name, tensor in stored.items():
                getattr(layer, name).load_qkv_weight(loaded_weight=tensor, num_heads=1, shard_id=shard_id,
                                                     shard_offset=sum(local[:i]), shard_size=local[i])
        method.process_weights_after_loading(layer)
        assert [layout.bits for layout in layer.bitcliff_weight.layouts] == [4, 2, 3]
        rows = torch.cat([torch.arange(sum(sizes[:i]) + rank * local[i], sum(sizes[:i]) + (rank + 1) * local[i])
                          for i in range(3)])
        torch.testing.assert_close(method.apply(layer, x), x @ dense[rows].t(), rtol=1e-4, atol=1e-4)


def test_a_fused_layer_missing_a_shard_is_refused_by_name(ranks):
    from bitcliff.serving.settings import LayerSettings
    from bitcliff.serving.vllm_config import BitcliffGPTQConfig
    from bitcliff.serving.vllm_method import BitcliffLinearMethod

    ranks(0)
    config = BitcliffGPTQConfig({"quant_method": "gptq", "bits": 3, "group_size": 64, "sym": False})
    method = BitcliffLinearMethod(config, [LayerSettings(4, 64), LayerSettings(2, 64)], "gate_up_proj",
                                  ["gate_proj", "up_proj"])
    layer = nn.Module()
    method.create_weights(layer, 128, [64, 64], 128, 128, torch.float32, weight_loader=None)
    (stored,), _ = checkpoint_layer(128, [64], 4, 64, seed=1)
    for name, tensor in stored.items():
        getattr(layer, name).load_merged_column_weight(loaded_weight=tensor, shard_id=0, shard_offset=0, shard_size=64)
    with pytest.raises(ValueError, match="no qweight up_proj"):
        method.process_weights_after_loading(layer)
