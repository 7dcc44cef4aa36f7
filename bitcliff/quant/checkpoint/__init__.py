"""GPTQ-format checkpoints: config.json with ``quantization_config`` + safetensors shards, the
layout GPTQModel, transformers and vLLM read; bitcliff is its one writer and reader.

* :mod:`~bitcliff.quant.checkpoint.format`: file names, ``quantization_config`` and the two
  zero-point conventions;
* :mod:`~bitcliff.quant.checkpoint.save`: writing a model (and the pieces the streaming GPTQ
  writer assembles one from);
* :mod:`~bitcliff.quant.checkpoint.load`: reading one back, with its repair side files.

What a repair stores beside the weights is written and read by :mod:`bitcliff.quant.repair_files`
and :mod:`bitcliff.quant.adapter`; per-module widths by :mod:`bitcliff.quant.dynamic`.
"""

from bitcliff.quant.checkpoint.format import (
    DEFAULT_SHARD_BYTES,
    FORMATS,
    INDEX_FILE,
    QUANT_KEYS,
    SAFETENSORS_DTYPES,
    SIDE_FILES,
    SINGLE_FILE,
    TOKENIZER_FILES,
    config_json,
    quantization_config,
    read_quantization_config,
    resolve_format,
    v1_to_v2_qzeros,
)
from bitcliff.quant.checkpoint.load import (
    check_files_present,
    check_side_files,
    load,
    load_tokenizer,
    read_weight_map,
    shard_files,
)
from bitcliff.quant.checkpoint.save import bias_flags, checkpoint_tensors, quant_linear_tensors, save, write_index
from bitcliff.quant.tensor_files import CheckpointError, MissingShardError

__all__ = [
    "DEFAULT_SHARD_BYTES", "FORMATS", "INDEX_FILE", "QUANT_KEYS", "SAFETENSORS_DTYPES", "SIDE_FILES", "SINGLE_FILE",
    "TOKENIZER_FILES", "CheckpointError", "MissingShardError", "bias_flags", "check_files_present",
    "check_side_files", "checkpoint_tensors", "config_json", "load", "load_tokenizer", "quant_linear_tensors",
    "quantization_config", "read_quantization_config", "read_weight_map", "resolve_format", "save", "shard_files",
    "v1_to_v2_qzeros", "write_index",
]
