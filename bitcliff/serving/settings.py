"""The quantization settings of one served layer, from ``quantization_config`` and its ``dynamic`` rules.

Engines fuse projections that share an input (vLLM: ``q_proj``, ``k_proj``, ``v_proj`` into
``qkv_proj``), but a checkpoint's ``dynamic`` rules name the projections as stored, one by one.
So a fused layer's settings are those of each of its shards, looked up under the shard's own
name; one packed tensor holds them when every shard has the same width and group size, and each
shard is kept apart otherwise (:mod:`bitcliff.serving.vllm_method`), a shard left in full precision
(a ``-:`` rule: restoration of a 4-bit module) as a dense weight.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from bitcliff.kernels.pack import SUPPORTED_BITS, widths_text
from bitcliff.quant.dynamic import dynamic_override
from bitcliff.serving.claim import UnsupportedCheckpoint


@dataclass(frozen=True)
class LayerSettings:
    """How one (possibly fused) layer is stored.

    Attributes:
        bits: code width, 2, 3 or 4.
        group_size: columns per group along K, -1 for one group.
    """

    bits: int
    group_size: int


def module_settings(qc: Mapping, name: str) -> LayerSettings | None:
    """Settings of the stored module ``name`` (``model.layers.0.self_attn.q_proj``); None when a
    ``-:`` rule leaves it in full precision."""
    override = dynamic_override(qc.get("dynamic"), name)
    if override is False:
        return None
    override = override or {}
    bits = override.get("bits", qc.get("bits"))
    group_size = override.get("group_size", qc.get("group_size", -1))
    if bits not in SUPPORTED_BITS:
        raise UnsupportedCheckpoint(f"{name}: bits={bits!r} (quantization_config or its dynamic rules); "
                                    f"bitcliff serves {widths_text()}")
    return LayerSettings(bits, group_size)


def shard_names(prefix: str, packed_modules: Mapping[str, Sequence[str]]) -> list[str]:
    """The stored module names behind the engine's layer ``prefix`` (itself when not fused)."""
    parent, _, leaf = prefix.rpartition(".")
    parts = packed_modules.get(leaf)
    if not parts:
        return [prefix]
    return [f"{parent}.{part}" if parent else part for part in parts]


def layer_settings(qc: Mapping, prefix: str,
                   packed_modules: Mapping[str, Sequence[str]]) -> tuple[LayerSettings | None, ...] | None:
    """Settings of each shard of the engine's layer ``prefix`` (one for a layer that is not fused),
    which may differ (a repair restores q_proj alone, ``quantize --avg-bits`` gives each projection
    its own width), None for a shard in full precision; None when the whole layer is."""
    settings = tuple(module_settings(qc, name) for name in shard_names(prefix, packed_modules))
    return None if all(s is None for s in settings) else settings
