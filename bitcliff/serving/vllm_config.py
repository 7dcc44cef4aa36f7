"""vLLM's quantization config for bitcliff checkpoints: claims them, then gives each layer its method.

Registered under :data:`METHOD_NAME` by :func:`bitcliff.serving.vllm_plugin.register`.  vLLM asks
every registered config, custom ones first, whether it takes a checkpoint
(:meth:`BitcliffGPTQConfig.override_quantization_method`); the rules are
:func:`bitcliff.serving.claim.claim`, so ``vllm serve <folder>`` needs no flag.  Passing
``--quantization bitcliff`` forces this path for any GPTQ checkpoint at 2, 3 or 4 bits.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.logger import init_logger
from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig, QuantizeMethodBase

from bitcliff.quant.checkpoint import FORMATS
from bitcliff.serving.checkpoint_folder import local_folder
from bitcliff.serving.claim import UnsupportedCheckpoint, claim
from bitcliff.serving.corrections import DROPPED_BY_THE_ENGINE, StoredCorrections
from bitcliff.serving.settings import layer_settings, shard_names

#: Under vLLM's logger, so that its handler prints the path taken.
log = init_logger("vllm.plugins.bitcliff")

METHOD_NAME = "bitcliff"


class BitcliffGPTQConfig(QuantizationConfig):
    """A GPTQ checkpoint's ``quantization_config``, as bitcliff serves it.

    Attributes:
        qc: the whole ``quantization_config`` (``dynamic`` rules are read per layer).
        zeros_minus_one: ``checkpoint_format="gptq"`` (v1) stores ``zero - 1``.
    """

    def __init__(self, qc: dict[str, Any]) -> None:
        super().__init__()
        fmt = qc.get("checkpoint_format", "gptq")
        if fmt not in FORMATS:
            raise UnsupportedCheckpoint(f"checkpoint_format {fmt!r}; bitcliff reads {FORMATS}")
        self.qc = dict(qc)
        self.zeros_minus_one = fmt == "gptq"
        self.corrections = StoredCorrections(None)  # the folder's, once the engine names it

    def __repr__(self) -> str:
        return (f"BitcliffGPTQConfig(bits={self.qc.get('bits')}, group_size={self.qc.get('group_size')}, "
                f"sym={self.qc.get('sym')}, desc_act={self.qc.get('desc_act')}, "
                f"checkpoint_format={self.qc.get('checkpoint_format', 'gptq')}, dynamic rules="
                f"{len(self.qc.get('dynamic') or {})})")

    @classmethod
    def get_name(cls) -> str:
        return METHOD_NAME

    @classmethod
    def get_supported_act_dtypes(cls) -> list[torch.dtype]:
        return [torch.float32, torch.float16, torch.bfloat16]

    @classmethod
    def get_min_capability(cls) -> int:
        return 70  # Volta, the oldest GPU Triton compiles for; vLLM checks it on CUDA only

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # the settings live in config.json's quantization_config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "BitcliffGPTQConfig":
        return cls(config)

    @classmethod
    def override_quantization_method(cls, hf_quant_cfg, user_quant, hf_config=None) -> str | None:
        """Claim the checkpoint by :func:`bitcliff.serving.claim.claim`, logging the path taken."""
        if user_quant not in (None, METHOD_NAME):
            return None  # the user chose another method: vLLM's own rules apply
        name = getattr(hf_config, "name_or_path", None) or None
        if str(hf_quant_cfg.get("quant_method", "")).lower() != "gptq":
            return None
        folder = local_folder(name)  # a hub id's snapshot where it has repair side files
        decision = claim(hf_quant_cfg, folder)
        if user_quant == METHOD_NAME and not decision.ours:
            log.info("bitcliff serves %s as asked (--quantization %s): %s", name, METHOD_NAME, decision.reason)
            return METHOD_NAME
        log.info("%s: %s -> %s", name or "checkpoint", decision.reason,
                 "bitcliff kernels" if decision.ours else "vLLM's own GPTQ path")
        return METHOD_NAME if decision.ours else None

    def maybe_update_config(self, model_name: str, hf_config=None, revision: str | None = None) -> None:
        """Note the checkpoint folder (a hub id's snapshot), whose repairs the layers read
        (:mod:`bitcliff.serving.corrections`)."""
        self.corrections = StoredCorrections(local_folder(model_name, revision))

    def get_checkpoint_weight_mapper(self):
        """Keep every weight (the base config drops ``.g_idx``, which act-order needs); leave the
        repair tensors to the layers, which read them from their own files.  Where the folder could
        not be resolved they reach the engine's loader, which refuses them by name."""
        import re

        from vllm.model_executor.models.utils import WeightsMapper

        if self.corrections.folder is None:
            return WeightsMapper()
        return WeightsMapper(orig_to_new_regex={re.compile(pattern): None for pattern in DROPPED_BY_THE_ENGINE})

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase | None:
        if not isinstance(layer, LinearBase):
            return None  # embeddings and the head stay as stored (bitcliff quantizes linears only)
        settings = layer_settings(self.qc, prefix, self.packed_modules_mapping)
        if settings is None:
            return UnquantizedLinearMethod()
        from bitcliff.serving.vllm_method import BitcliffLinearMethod

        return BitcliffLinearMethod(self, settings, prefix, shard_names(prefix, self.packed_modules_mapping))
