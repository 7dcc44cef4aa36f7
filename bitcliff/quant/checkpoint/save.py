"""Writing a GPTQ checkpoint: config.json with ``quantization_config`` + safetensors shards.

On disk each quantized linear ``<name>`` has ``<name>.qweight`` (int32 ``[K*bits/32, N]``),
``<name>.qzeros`` (int32 ``[n_groups, N*bits/32]``), ``<name>.scales`` (fp16 ``[n_groups, N]``),
``<name>.g_idx`` (int32 ``[K]``) and optionally ``<name>.bias`` (fp16 ``[N]``): the layout that
GPTQModel, transformers and vLLM read.

:func:`save` writes a model in memory; the streaming GPTQ writer assembles a checkpoint from the
same pieces (:func:`checkpoint_tensors`, :func:`~bitcliff.quant.checkpoint.format.config_json`,
:func:`write_index`).  Writes are atomic (:mod:`bitcliff.storage`): everything goes to a temporary
sibling folder that is renamed into place only when complete; an existing checkpoint is replaced
only with ``overwrite=True``, and only if bitcliff wrote it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from bitcliff.kernels.pack import pack_qzeros, unpack_qzeros
from bitcliff.layers import architecture_of
from bitcliff.quant.adapter import CONFIG_FILE as ADAPTER_CONFIG
from bitcliff.quant.adapter import WEIGHTS_FILE as ADAPTER_WEIGHTS
from bitcliff.quant.adapter import adapter_tensors
from bitcliff.quant.checkpoint.format import (
    DEFAULT_SHARD_BYTES,
    INDEX_FILE,
    SAFETENSORS_DTYPES,
    SIDE_FILES,
    config_json,
    resolve_format,
)
from bitcliff.quant.dynamic import dynamic_entries, module_overrides
from bitcliff.quant.factors import FACTORS_FILE
from bitcliff.quant.gptq_model import gptq_log, write_gptq_log
from bitcliff.quant.outliers import OUTLIERS_FILE
from bitcliff.quant.qlinear import QuantLinear
from bitcliff.quant.repair_files import factor_tensors, outlier_tensors
from bitcliff.quant.surgery import quant_config
from bitcliff.storage import replace_folder, save_tensors, write_json

log = logging.getLogger(__name__)


def quant_linear_tensors(name: str, layer: QuantLinear, fmt: str) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of one ``QuantLinear`` (``<name>.qweight`` ...) in format ``fmt``."""
    qzeros = layer.qzeros
    if fmt == "gptq":
        zeros = unpack_qzeros(layer.qzeros, layer.bits, layer.out_features)
        if bool((zeros == 0).any()):
            raise ValueError(f"{name} has zero points of 0, which checkpoint_format='gptq' (v1) cannot hold")
        qzeros = pack_qzeros(zeros - 1, layer.bits)
    tensors = {
        f"{name}.qweight": layer.qweight,
        f"{name}.qzeros": qzeros,
        f"{name}.scales": layer.scales.to(torch.float16),
        f"{name}.g_idx": layer.g_idx,
    }
    if layer.bias is not None:
        tensors[f"{name}.bias"] = layer.bias.to(torch.float16)
    return tensors


def checkpoint_tensors(
    model: nn.Module, fmt: str, dtype: torch.dtype | None, prefix: str = "", exclude: str | None = None
) -> dict[str, torch.Tensor]:
    """Every tensor of ``model`` as stored in a checkpoint, on the CPU, contiguous.

    Args:
        model: a quantized model, or a part of one (a decoder layer).
        fmt: "gptq" or "gptq_v2" (:func:`resolve_format`).
        dtype: dtype of the unquantized floating tensors; None keeps each tensor's own.
        prefix: prepended to every name (a layer's path, ``"model.layers.7."``).
        exclude: leave out tensors under this module path (layers written earlier).
    Tied tensors (the head sharing the embeddings) are stored once, under the first name.
    """
    quantized = {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in quantized.items():
        if exclude is None or not name.startswith(exclude + "."):
            tensors.update(quant_linear_tensors(prefix + name, layer, fmt))
    seen: set[int] = set()
    for key, value in model.state_dict().items():
        module_name = key.rpartition(".")[0]
        if module_name in quantized or (exclude is not None and key.startswith(exclude + ".")):
            continue
        ptr = value.untyped_storage().data_ptr()
        if ptr in seen:  # a tied weight (lm_head = embeddings): stored once
            continue
        seen.add(ptr)
        tensors[prefix + key] = value.to(dtype) if dtype is not None and value.is_floating_point() else value
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}


def bias_flags(model: nn.Module) -> dict[str, bool]:
    """The config.json bias flags (its family's ``bias_flags``) the model's config knows, set where
    every projection they cover has a bias (a repaired model's corrected biases), so that readers
    building the model from config.json load them."""
    config = model.config.to_dict()
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, (QuantLinear, nn.Linear))]
    flags = {}
    arch = architecture_of(model)
    for flag, part in arch.bias_flags:
        covered = [m for n, m in linears if f".{arch.attribute(part)}." in f".{n}."]
        if flag in config and covered and all(m.bias is not None for m in covered):
            flags[flag] = True
    return flags


def write_index(folder: Path) -> Path:
    """Write ``model.safetensors.index.json`` for every safetensors file in ``folder``."""
    weight_map, total = {}, 0
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                weight_map[key] = path.name
                piece = f.get_slice(key)
                total += SAFETENSORS_DTYPES[piece.get_dtype()].itemsize * _numel(piece.get_shape())
    return write_json(folder / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def save(
    model: nn.Module,
    directory: str | os.PathLike,
    tokenizer=None,
    *,
    overwrite: bool = False,
    checkpoint_format: str = "auto",
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    extra_files: dict | None = None,
) -> Path:
    """Save a model quantized by :func:`bitcliff.quantize` as a GPTQ checkpoint.

    Args:
        model: transformers model whose linears are ``QuantLinear`` (its config attached).
        directory: output folder (created; an existing non-empty one is refused unless
            ``overwrite``, and even then if it holds files bitcliff did not write).
        tokenizer: saved beside the weights when given.
        overwrite: replace an existing checkpoint folder bitcliff wrote.
        checkpoint_format: "auto", "gptq" (v1) or "gptq_v2"; see :func:`resolve_format`.
        dtype: dtype of the unquantized floating tensors (embeddings, norms, head); ``None``
            keeps the model's own, so the reloaded model computes exactly what was saved.
        max_shard_bytes: shard size limit (huggingface_hub's sharding); one ``model.safetensors``
            when everything fits.
        extra_files: file name -> ``write(path)``, written into the folder with the rest (a
            repair's record).
    Modules stored unlike the config (restored to other bits or full precision) are listed in
    ``quantization_config["dynamic"]``; low-rank terms go beside the weights as a PEFT LoRA
    adapter (:mod:`bitcliff.quant.adapter`) or, with quantized factors, in ``lowrank.safetensors``
    (:mod:`bitcliff.quant.factors`), sparse outliers in ``outliers.safetensors``
    (:mod:`bitcliff.quant.outliers`; readers of GPTQ checkpoints that do not know it load the
    model without them).
    Returns:
        The checkpoint folder; a model quantized by GPTQ in memory also gets its per-module log,
        ``gptq_log.json``.
    """
    from huggingface_hub import save_torch_state_dict

    config = quant_config(model)
    if config is None or not any(isinstance(m, QuantLinear) for m in model.modules()):
        raise ValueError("model is not quantized: run bitcliff.quantize(model, QuantConfig(...)) first")
    fmt = resolve_format(checkpoint_format, config.sym)
    tensors = checkpoint_tensors(model, fmt, dtype)
    stored = dtype or model.get_input_embeddings().weight.dtype
    model_json = config_json({**model.config.to_dict(), **bias_flags(model)}, config, fmt, stored,
                             dynamic_entries(module_overrides(model, config)))
    entries = gptq_log(model)
    lora_config, lora_tensors = adapter_tensors(model)
    sparse = outlier_tensors(model)
    factors = factor_tensors(model)

    def fill(tmp: Path) -> None:
        save_torch_state_dict(tensors, tmp, max_shard_size=max_shard_bytes, metadata={"format": "pt"})
        write_json(tmp / "config.json", model_json, sort_keys=True)
        if entries is not None:
            write_gptq_log(entries, tmp)
        if lora_config:
            write_json(tmp / ADAPTER_CONFIG, lora_config, sort_keys=True)
            save_tensors(lora_tensors, tmp / ADAPTER_WEIGHTS)
        if sparse:
            save_tensors(sparse, tmp / OUTLIERS_FILE)
        if factors:
            save_tensors(factors, tmp / FACTORS_FILE)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, write in (extra_files or {}).items():
            write(tmp / name)

    path = replace_folder(Path(directory), fill, overwrite, kind="checkpoint", bound=SIDE_FILES)
    log.info("saved a checkpoint to %s (checkpoint_format=%s)", path, fmt)
    return path
