"""vLLM's linear method for bitcliff checkpoints: packed GPTQ tensors in, bitcliff's kernels out.

``create_weights`` declares the checkpoint tensors with the sharding rules of
:mod:`bitcliff.serving.sharding` (vLLM slices them per rank and per fused shard);
``process_weights_after_loading`` builds the layer's kernel layouts once
(:func:`bitcliff.serving.packed_weight.build`), drops the loaded tensors, and cuts a repaired
checkpoint's corrections to this rank (:mod:`bitcliff.serving.corrections`); ``apply`` runs the
kernel (the compiled CPU kernel on the CPU, the Triton kernels on CUDA) and adds the corrections.
"""

from __future__ import annotations

from collections.abc import Sequence
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

from bitcliff.kernels.pack import num_groups, unpack_qzeros
from bitcliff.quant.checkpoint import v1_to_v2_qzeros
from bitcliff.quant.dynamic import FULL_PRECISION
from bitcliff.serving import corrections, packed_weight
from bitcliff.serving.claim import UnsupportedCheckpoint
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


class ShardPieces(BasevLLMParameter):
    """A fused layer's ``qweight``, ``qzeros`` or ``scales`` whose shards are stored at different
    widths or group sizes, so that no single packed tensor holds them, or the dense ``weight`` of
    its shards left in full precision: each shard's part for this rank is kept apart, zero points
    unpacked (int32 ``[G_s, N_s_rank]``, true zeros), a dense weight ``[N_s_rank, K]`` in the
    model's dtype.

    Args:
        kind: ``qweight``, ``qzeros``, ``scales`` or ``weight``.
        bits: each shard's width (None for a full-precision shard).
        zeros_minus_one: the checkpoint stores ``zero - 1`` (GPTQ v1).
        dtype: what a dense weight is held in.
    """

    def __new__(cls, kind: str, bits: Sequence[int | None], zeros_minus_one: bool, dtype: torch.dtype,
                weight_loader):
        return super().__new__(cls, data=torch.empty(0, dtype=torch.int32))

    def __init__(self, kind: str, bits: Sequence[int | None], zeros_minus_one: bool, dtype: torch.dtype,
                 weight_loader) -> None:
        super().__init__(data=torch.empty(0, dtype=torch.int32), weight_loader=weight_loader)
        self.kind, self.bits, self.zeros_minus_one, self.dense_dtype = kind, tuple(bits), zeros_minus_one, dtype
        self.pieces: dict[int, torch.Tensor] = {}

    def _keep(self, shard: int, part: int, size: int, loaded: torch.Tensor) -> None:
        if (self.kind == "weight") != (self.bits[shard] is None):
            stored = "in full precision" if self.bits[shard] is None else f"at {self.bits[shard]} bits"
            raise ValueError(f"the checkpoint gives a {self.kind} for shard {shard}, which its quantization_config "
                             f"stores {stored}")
        if self.kind == "qzeros":  # packed along the outputs: unpack, so that any split is exact
            bits, n = self.bits[shard], loaded.shape[1] * 32 // self.bits[shard]
            if self.zeros_minus_one:
                loaded = v1_to_v2_qzeros(loaded, bits, n)
            loaded = unpack_qzeros(loaded, bits, n)
        out_dim = 0 if self.kind == "weight" else 1  # a dense weight is [N, K], the packed tensors [., N]
        if loaded.shape[out_dim] < (part + 1) * size:
            raise ValueError(f"{self.kind} of shard {shard} has {loaded.shape[out_dim]} outputs; this rank's part "
                             f"{part} of {size} lies beyond them")
        piece = loaded.narrow(out_dim, part * size, size)
        # a copy: the rank's part only, not a view holding the whole loaded tensor
        self.pieces[shard] = piece.to(self.dense_dtype, copy=True) if self.kind == "weight" else piece.clone()

    def load_qkv_weight(self, loaded_weight: torch.Tensor, num_heads: int = 1, shard_id=None, shard_size=None,
                        **kwargs) -> None:
        # the engine's rule: key/value heads are replicated over num_heads ranks
        part = self.tp_rank if shard_id == "q" else self.tp_rank // num_heads
        self._keep("qkv".index(shard_id), part, shard_size, loaded_weight)

    def load_merged_column_weight(self, loaded_weight: torch.Tensor, shard_id=None, shard_size=None,
                                  **kwargs) -> None:
        self._keep(int(shard_id), self.tp_rank, shard_size, loaded_weight)


@register_weight_loader_v2_supported_method
class BitcliffLinearMethod(LinearMethodBase):
    """One linear layer (fused or not) of a bitcliff-served checkpoint.

    Args:
        config: the checkpoint's :class:`~bitcliff.serving.vllm_config.BitcliffGPTQConfig`.
        settings: each shard's width and group size (``dynamic`` rules applied), None for a shard
            in full precision, in the layer's fused order; one for a layer that is not fused.
        prefix: the layer's name in vLLM's model, for messages.
        shard_names: the stored modules behind it, in the same order.
    """

    def __init__(self, config, settings: Sequence[LayerSettings | None], prefix: str,
                 shard_names: list[str]) -> None:
        if len(settings) != len(shard_names):
            raise ValueError(f"{prefix}: {len(settings)} settings for {len(shard_names)} shards {shard_names}")
        self.config = config
        self.settings = tuple(settings)
        self.prefix = prefix
        self.shard_names = shard_names

    @property
    def uniform(self) -> bool:
        """Every shard stored alike: one packed tensor holds the layer."""
        return all(s == self.settings[0] for s in self.settings)

    @property
    def _stored_tensors(self) -> tuple[str, ...]:
        """What the checkpoint gives for the layer: the packed tensors, and a dense ``weight``
        where a shard is in full precision; ``g_idx`` last."""
        dense = ("weight",) if None in self.settings else ()
        return (*TENSORS[:3], *dense, TENSORS[3])

    def _expected(self, kind: str) -> list[int]:
        """The shards whose ``kind`` the checkpoint must give."""
        return [i for i, s in enumerate(self.settings) if (s is None) == (kind == "weight")]

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
        groups: a row-parallel rank keeps the ones it uses once loaded); for shards stored
        differently, :class:`ShardPieces` in place of the first three, and a dense ``weight``
        for those in full precision."""
        loader = extra_weight_attrs.get("weight_loader")
        g_idx = ShardGroupIndex(
            data=torch.empty(len(output_partition_sizes), input_size_per_partition, dtype=torch.int32),
            weight_loader=loader)
        layer.bitcliff_shard_sizes = tuple(output_partition_sizes)
        layer.bitcliff_in_features = input_size
        if not self.uniform:
            if len(output_partition_sizes) != len(self.settings):
                raise ValueError(f"{self.prefix}: {len(output_partition_sizes)} fused parts for "
                                 f"{len(self.settings)} stored modules")
            for size, setting, name in zip(output_partition_sizes, self.settings, self.shard_names):
                if setting is not None:
                    check_packable([size], setting.bits, f"{name} output features per rank")
            bits = [None if setting is None else setting.bits for setting in self.settings]
            for name in self._stored_tensors[:-1]:
                layer.register_parameter(name, ShardPieces(name, bits, self.config.zeros_minus_one, params_dtype,
                                                           loader))
            layer.register_parameter("g_idx", g_idx)
            return
        bits, group_size = self.settings[0].bits, self.settings[0].group_size
        n_rank = sum(output_partition_sizes)
        check_packable(output_partition_sizes, bits, f"{self.prefix} output features per rank and fused part")
        check_packable([input_size_per_partition], bits, f"{self.prefix} input features per rank")
        factor = Fraction(32, bits)  # codes per int32 word; a Fraction keeps 3-bit offsets exact
        if factor.denominator == 1:
            factor = int(factor)
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
        for name, param in zip(TENSORS, (qweight, qzeros, scales, g_idx)):
            layer.register_parameter(name, param)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        """Build the kernel layouts once and free the loaded tensors (no dense copy is kept)."""
        layer.bitcliff_weight_device = layer.g_idx.device
        if self.uniform:
            layer.bitcliff_weight = packed_weight.build(
                layer.qweight.data, layer.qzeros.data, layer.scales.data, layer.g_idx.data, self.settings[0].bits,
                layer.bitcliff_shard_sizes, self.config.zeros_minus_one)
        else:
            missing = [f"{name} {self.shard_names[i]}" for name in self._stored_tensors[:-1]
                       for i in self._expected(name) if i not in getattr(layer, name).pieces]
            if missing:
                raise ValueError(f"{self.prefix}: the checkpoint gave no {', '.join(missing)}")
            layer.bitcliff_weight = packed_weight.build_shards(
                [layer.weight.pieces[i] if setting is None else
                 (layer.qweight.pieces[i], layer.qzeros.pieces[i], layer.scales.pieces[i], layer.g_idx.data[i],
                  setting.bits) for i, setting in enumerate(self.settings)], layer.bitcliff_weight_device)
        for name in self._stored_tensors:
            delattr(layer, name)
        kinds = sorted({"a dense weight" if isinstance(layout, torch.Tensor) else type(layout).__name__
                        for layout in layer.bitcliff_weight.layouts})
        widths = "/".join(str(FULL_PRECISION if s is None else s.bits) for s in self.settings[:1 if self.uniform else None])
        log.info_once("bitcliff runs %s-bit layers with %s", widths, ", ".join(kinds))
        layer.bitcliff_correction = self._rank_correction(layer)

    def _rank_correction(self, layer: torch.nn.Module) -> corrections.RankCorrection | None:
        """This rank's part of the repairs stored for the layer's modules (None without any)."""
        stored = self.config.corrections
        found = [stored.module(name) for name in self.shard_names]
        if all(c is None for c in found):
            return None
        rows, columns, first_rank = _rank_indices(layer, [stored.shape(n)[0] for n in self.shard_names],
                                                  layer.bitcliff_in_features, self.prefix)
        # an engine layer with its own bias loaded the checkpoint's; the row-parallel sum adds it once
        with_bias = getattr(layer, "bias", None) is None and first_rank
        correction = corrections.for_rank(found, [stored.shape(n)[0] for n in self.shard_names],
                                          layer.bitcliff_in_features, rows, columns, with_bias)
        log.info_once("bitcliff applies the repairs stored beside the weights (low-rank terms, sparse outliers, "
                      "biases) in the layers that have them")
        return correction.to(layer.bitcliff_weight_device) if correction is not None else None

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        y = packed_weight.matmul(x, layer.bitcliff_weight, bias)
        if layer.bitcliff_correction is not None:
            y = layer.bitcliff_correction.add_to(y, x)
        return y


def _rank_indices(layer: torch.nn.Module, out_sizes: list[int], in_features: int, prefix: str):
    """Which of the layer's stacked output rows and input features this rank holds, learnt by
    loading index vectors through the layer's own weight loader (vLLM's slicing, q/k/v head
    replication included).

    Returns:
        ``(rows, columns, first_rank)``: int64 ``[N_rank]`` stacked rows (shard offset + row),
        int64 ``[K_rank]`` input features, and whether this rank is the one a row-parallel layer's
        bias belongs to.
    """
    from vllm.model_executor.layers.linear import (
        ColumnParallelLinear,
        MergedColumnParallelLinear,
        QKVParallelLinear,
        ReplicatedLinear,
        RowParallelLinear,
    )
    from vllm.model_executor.parameter import ModelWeightParameter

    n_rank, k_rank = sum(layer.bitcliff_shard_sizes), layer.input_size_per_partition
    all_rows, all_columns = torch.arange(sum(out_sizes)), torch.arange(in_features)
    if isinstance(layer, ReplicatedLinear):
        return all_rows, all_columns, True
    if isinstance(layer, RowParallelLinear):
        index = ModelWeightParameter(data=torch.full((1, k_rank), -1, dtype=torch.int64), input_dim=1, output_dim=0,
                                     weight_loader=layer.weight_loader_v2)
        layer.weight_loader_v2(index, all_columns.view(1, -1))
        return all_rows, index.data[0].clone(), layer.tp_rank == 0
    if not isinstance(layer, ColumnParallelLinear):
        raise UnsupportedCheckpoint(f"{prefix}: a {type(layer).__name__} holds stored repairs, and the plugin "
                                    "applies them in column-parallel, row-parallel and replicated layers only")
    if isinstance(layer, QKVParallelLinear):
        shard_ids = ["q", "k", "v"][:len(out_sizes)]
    elif isinstance(layer, MergedColumnParallelLinear):
        shard_ids = list(range(len(out_sizes)))
    else:
        shard_ids = [None]
    index = ModelWeightParameter(data=torch.full((n_rank, 1), -1, dtype=torch.int64), input_dim=1, output_dim=0,
                                 weight_loader=layer.weight_loader_v2)
    offset = 0
    for shard_id, n in zip(shard_ids, out_sizes):
        stacked = (offset + torch.arange(n)).view(-1, 1)
        layer.weight_loader_v2(index, stacked) if shard_id is None else layer.weight_loader_v2(index, stacked, shard_id)
        offset += n
    rows = index.data[:, 0].clone()
    if bool((rows < 0).any()):
        raise UnsupportedCheckpoint(f"{prefix}: the engine's loader left some of this rank's outputs unmapped; its "
                                    "repairs cannot be placed")
    return rows, all_columns, True
