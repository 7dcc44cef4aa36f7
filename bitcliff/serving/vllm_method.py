"""vLLM's linear method for bitcliff checkpoints: packed GPTQ tensors in, bitcliff's kernels out.

``create_weights`` declares the checkpoint tensors with the sharding rules of
:mod:`bitcliff.serving.sharding` (vLLM slices them per rank and per fused shard);
``process_weights_after_loading`` builds the layer's kernel layouts once
(:func:`bitcliff.serving.packed_weight.build`) and drops the loaded tensors; ``apply`` runs the
kernel: the compiled CPU kernel on the CPU, the Triton kernels on CUDA.
"""

from __future__ import annotations

from fractions import Fraction

import torch
from vllm.model_executor.layers.linear import LinearMethodBase, register_weight_loader_v2_supported_method
from vllm.model_executor.parameter import (
    BasevLLMParameter,
    ChannelQuantScaleParameter,
    PackedColumnParameter,
    PackedvLLMParameter,
)

from vllm.logger import init_logger

from bitcliff.kernels.pack import num_groups
from bitcliff.serving import packed_weight
from bitcliff.serving.settings import LayerSettings
from bitcliff.serving.sharding import check_packable

log = init_logger("vllm.plugins.bitcliff")

#: What the loaded tensors are called on the layer (the checkpoint's names).
TENSORS = ("qweight", "qzeros", "scales", "g_idx")


class ShardGroupIndex(BasevLLMParameter):
    """``g_idx`` of a possibly fused layer: int32 ``[S, K_rank]``, one row per fused shard.

    vLLM loads a parameter without an output dimension whole for each shard, so a single
    ``[K]`` g_idx would keep only the last shard's; act-order gives each projection its own.
    Row-parallel layers slice it along K like the packed weight.
    """

    def _load_row(self, row: int, loaded: torch.Tensor) -> None:
        if loaded.shape != self.data[row].shape:
            raise ValueError(f"g_idx of {tuple(loaded.shape)} does not fit the layer's {tuple(self.data[row].shape)}")
        self.data[row].copy_(loaded)

    def load_column_parallel_weight(self, loaded_weight: torch.Tensor) -> None:
        self._load_row(0, loaded_weight)

    def load_row_parallel_weight(self, loaded_weight: torch.Tensor) -> None:
        part = self.data.shape[1]
        self._load_row(0, loaded_weight.narrow(0, self.tp_rank * part, part))

    def load_merged_column_weight(self, loaded_weight: torch.Tensor, **kwargs) -> None:
        self._load_row(self._shard_id_as_int(kwargs["shard_id"]), loaded_weight)

    def load_qkv_weight(self, loaded_weight: torch.Tensor, **kwargs) -> None:
        self._load_row(self._shard_id_as_int(kwargs["shard_id"]), loaded_weight)


@register_weight_loader_v2_supported_method
class BitcliffLinearMethod(LinearMethodBase):
    """One linear layer (fused or not) of a bitcliff-served checkpoint.

    Args:
        config: the checkpoint's :class:`~bitcliff.serving.vllm_config.BitcliffGPTQConfig`.
        settings: this layer's width and group size (``dynamic`` rules applied).
        prefix: the layer's name in vLLM's model, for messages.
    """

    def __init__(self, config, settings: LayerSettings, prefix: str) -> None:
        self.config = config
        self.settings = settings
        self.prefix = prefix

    def create_weights(
        self,
        layer: torch.nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs,
    ) -> None:
        """Declare int32 ``qweight`` ``[K_rank*b/32, N_rank]``, int32 ``qzeros`` ``[G, N_rank*b/32]``,
        fp16 ``scales`` ``[G, N_rank]`` and int32 ``g_idx`` ``[S, K_rank]`` (``G`` all of the layer's
        groups: a row-parallel rank keeps the ones it uses once loaded)."""
        bits, group_size = self.settings.bits, self.settings.group_size
        n_rank = sum(output_partition_sizes)
        check_packable(output_partition_sizes, bits, f"{self.prefix} output features per rank and fused part")
        check_packable([input_size_per_partition], bits, f"{self.prefix} input features per rank")
        factor = Fraction(32, bits)  # codes per int32 word; a Fraction keeps 3-bit offsets exact
        if factor.denominator == 1:
            factor = int(factor)
        loader = extra_weight_attrs.get("weight_loader")
        groups = num_groups(input_size, group_size)
        qweight = PackedvLLMParameter(
            data=torch.empty(input_size_per_partition * bits // 32, n_rank, dtype=torch.int32),
            input_dim=0, output_dim=1, packed_dim=0, packed_factor=factor, weight_loader=loader)
        qzeros = PackedColumnParameter(
            data=torch.empty(groups, n_rank * bits // 32, dtype=torch.int32),
            output_dim=1, packed_dim=1, packed_factor=factor, weight_loader=loader)
        # fp16 as stored: exact, and what the compiled CPU kernel reads
        scales = ChannelQuantScaleParameter(
            data=torch.empty(groups, n_rank, dtype=torch.float16), output_dim=1, weight_loader=loader)
        g_idx = ShardGroupIndex(
            data=torch.empty(len(output_partition_sizes), input_size_per_partition, dtype=torch.int32),
            weight_loader=loader)
        for name, param in zip(TENSORS, (qweight, qzeros, scales, g_idx)):
            layer.register_parameter(name, param)
        layer.bitcliff_shard_sizes = tuple(output_partition_sizes)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        """Build the kernel layouts once and free the loaded tensors (no dense copy is kept)."""
        layer.bitcliff_weight = packed_weight.build(
            layer.qweight.data, layer.qzeros.data, layer.scales.data, layer.g_idx.data, self.settings.bits,
            layer.bitcliff_shard_sizes, self.config.zeros_minus_one)
        for name in TENSORS:
            delattr(layer, name)
        kinds = sorted({type(layout).__name__ for layout in layer.bitcliff_weight.layouts})
        log.info_once("bitcliff runs %s-bit layers with %s", self.settings.bits, ", ".join(kinds))

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return packed_weight.matmul(x, layer.bitcliff_weight, bias)
