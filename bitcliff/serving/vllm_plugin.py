"""The ``vllm.general_plugins`` entry point: registers bitcliff's quantization config with vLLM.

vLLM calls :func:`register` in every process it starts (the engine and each worker), so it must
be cheap and safe to call more than once.
"""

from __future__ import annotations


def register() -> None:
    """Register :class:`~bitcliff.serving.vllm_config.BitcliffGPTQConfig` under ``"bitcliff"``."""
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, register_quantization_config

    from bitcliff.serving.vllm_config import METHOD_NAME, BitcliffGPTQConfig

    if METHOD_NAME in QUANTIZATION_METHODS:
        return
    register_quantization_config(METHOD_NAME)(BitcliffGPTQConfig)
