"""Reading a GPTQ checkpoint back into a transformers model whose linears are ``QuantLinear``:
the weight files, the side files a repair stores (each bound to its checkpoint by the manifest),
and the checks that refuse a folder that is incomplete, hand-edited into something else, or
mixed with another checkpoint's files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from bitcliff.device import HOST, compute_dtype, resolve_device, trained_dtype
from bitcliff.kernels.pack import SUPPORTED_BITS, num_groups, packed_length, unpack_qzeros, widths_text
from bitcliff.quant.adapter import CONFIG_FILE as ADAPTER_CONFIG
from bitcliff.quant.adapter import WEIGHTS_FILE as ADAPTER_WEIGHTS
from bitcliff.quant.adapter import has_adapter, load_adapter
from bitcliff.quant.checkpoint.format import (
    INDEX_FILE,
    MODEL_FILE_SUFFIXES,
    OWN_SIDE_FILES,
    QUANT_KEYS,
    SIDE_FILES,
    SINGLE_FILE,
    config_from_qc,
    read_quantization_config,
    v1_to_v2_qzeros,
)
from bitcliff.quant.dynamic import dynamic_override
from bitcliff.quant.factors import FACTORS_FILE
from bitcliff.quant.outliers import OUTLIERS_FILE
from bitcliff.quant.qlinear import QuantLinear
from bitcliff.quant.repair_files import load_factors, load_outliers
from bitcliff.quant.surgery import attach_config, set_submodule
from bitcliff.quant.tensor_files import CheckpointError, MissingShardError, read_tensors
from bitcliff.quant.unembedding import read_unembedding_in_bf16
from bitcliff.storage import MANIFEST, file_sha256, read_manifest


def read_weight_map(directory: Path) -> dict[str, str]:
    """Tensor name -> safetensors file name of a checkpoint or model folder (one file, or
    shards with an index), every listed file checked to exist.

    Raises:
        CheckpointError: no weights, or an unreadable index.
        MissingShardError: a file the index lists is missing (also a ``FileNotFoundError``).
    """
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = dict(json.loads(index.read_text())["weight_map"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{index} is not a valid safetensors index: {exc}") from exc
    elif (directory / SINGLE_FILE).is_file():
        try:
            with safe_open(str(directory / SINGLE_FILE), framework="pt") as f:
                weight_map = {key: SINGLE_FILE for key in f.keys()}
        except Exception as exc:  # safetensors raises its own error types for bad headers
            raise CheckpointError(f"{directory / SINGLE_FILE} could not be read (truncated or corrupt?): {exc}") from exc
    else:
        raise CheckpointError(f"{directory} holds neither {SINGLE_FILE} nor {INDEX_FILE}")
    missing = sorted({name for name in weight_map.values() if not (directory / name).is_file()})
    if missing:
        raise MissingShardError(f"{directory}: shard(s) listed in {INDEX_FILE} are missing: {', '.join(missing)}")
    return weight_map


def shard_files(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint, all checked to exist."""
    return [directory / name for name in sorted(set(read_weight_map(directory).values()))]


def check_side_files(directory: Path) -> None:
    """Refuse a side file (:data:`SIDE_FILES`) that is not this checkpoint's own: one its manifest
    does not list, one whose bytes differ from the digest it records, or one of bitcliff's own
    files in a folder without a manifest.  A manifest written before digests were recorded
    binds by name only."""
    manifest = read_manifest(directory)
    if manifest is not None:
        _check_manifest(directory, manifest)
    for name in SIDE_FILES:
        if not (directory / name).is_file():
            continue
        if manifest is None:
            if name in OWN_SIDE_FILES:
                raise CheckpointError(f"{directory} holds {name} but no bitcliff manifest to bind it to these weights: "
                                      f"it may be another checkpoint's; remove it, or load the checkpoint it came with")
            continue
        digests = manifest.get("digests")
        if name not in manifest["files"]:
            reason = "its manifest does not list it"
        elif isinstance(digests, dict) and digests.get(name) != file_sha256(directory / name):
            reason = "its bytes differ from the digest its manifest records"
        else:
            continue
        raise CheckpointError(f"{directory / name} is not this checkpoint's own ({reason}): it may have been copied "
                              "from another checkpoint, whose repairs would be applied to these weights; remove it, "
                              "or copy the whole checkpoint it came from")


def _check_manifest(directory: Path, manifest: dict) -> None:
    """Refuse a hand-edited manifest whose fields :func:`check_side_files` would misread: with
    ``digests`` not a mapping of name to digest, a side file would be bound by its name alone."""
    if not all(isinstance(name, str) for name in manifest["files"]):
        raise CheckpointError(f"{directory / MANIFEST}: 'files' must list file names, got {manifest['files']!r}")
    digests = manifest.get("digests")
    if digests is not None and not (isinstance(digests, dict)
                                    and all(isinstance(v, str) for v in digests.values())):
        raise CheckpointError(f"{directory / MANIFEST}: 'digests' must map file names to sha256 digests, "
                              f"got {digests!r}; re-create the checkpoint")


def check_files_present(directory: Path) -> None:
    """Refuse a checkpoint that lacks a file bitcliff wrote into it and reads back (config, weights,
    adapter), by the folder's manifest: loading without it would silently give another model
    (a repaired checkpoint without its adapter evaluates as if never repaired); and one whose side
    files are not its own (:func:`check_side_files`)."""
    check_side_files(directory)
    try:
        listed = json.loads((directory / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return  # not written by bitcliff (a peer's checkpoint): nothing to hold it to
    needed = [f for f in listed if "/" not in f and (f in ("config.json", ADAPTER_CONFIG, ADAPTER_WEIGHTS, OUTLIERS_FILE, FACTORS_FILE)
                                                    or f.endswith(MODEL_FILE_SUFFIXES))]
    missing = [f for f in needed if not (directory / f).is_file()]
    if missing:
        raise CheckpointError(f"{directory} lacks {', '.join(missing)}, which bitcliff wrote there and the model is "
                              "built from: the checkpoint is incomplete; copy the whole folder again or re-create it")


def _build_layer(name: str, linear: nn.Module, tensors: dict, qc: dict, fmt: str) -> QuantLinear:
    if not isinstance(linear, nn.Linear):
        raise CheckpointError(f"{name} holds quantized tensors but the model has {type(linear).__name__} there")
    override = dynamic_override(qc.get("dynamic"), name)
    if override is False:
        raise CheckpointError(f"{name} holds quantized tensors but quantization_config.dynamic leaves it unquantized")
    override = override or {}
    bits, group_size = override.get("bits", qc["bits"]), override.get("group_size", qc.get("group_size", -1))
    if bits not in SUPPORTED_BITS:
        raise CheckpointError(f"{name}: quantization_config.dynamic gives bits={bits!r}; bitcliff reads {widths_text()}")
    k, n = linear.in_features, linear.out_features
    parts = {key: tensors.pop(f"{name}.{key}", None) for key in (*QUANT_KEYS, "bias")}
    missing = [key for key in QUANT_KEYS if parts[key] is None]
    if missing:
        raise CheckpointError(f"{name}: checkpoint is missing {', '.join(missing)}")
    rows = parts["qweight"].shape[0]
    if rows != packed_length(k, bits) or parts["qweight"].shape[1] != n:
        raise CheckpointError(
            f"{name}.qweight has shape {tuple(parts['qweight'].shape)}, but config bits={bits} with "
            f"in_features={k}, out_features={n} needs ({packed_length(k, bits)}, {n})"
        )
    n_groups = parts["scales"].shape[0]
    desc_act = bool(qc.get("desc_act", False))
    if not desc_act and n_groups != num_groups(k, group_size):
        raise CheckpointError(
            f"{name}.scales has {n_groups} groups, but config group_size={group_size} with "
            f"in_features={k} needs {num_groups(k, group_size)}"
        )
    layer = QuantLinear(k, n, bits, group_size, n_groups, bias=parts["bias"] is not None, name=name)
    if fmt == "gptq":  # v1 stores zero - 1
        if tuple(parts["qzeros"].shape) != (n_groups, packed_length(n, bits)):
            raise CheckpointError(
                f"{name}.qzeros has shape {tuple(parts['qzeros'].shape)}, expected ({n_groups}, {packed_length(n, bits)})"
            )
        parts["qzeros"] = v1_to_v2_qzeros(parts["qzeros"], bits, n)
    if override.get("sym", qc.get("sym", False)):
        zeros = unpack_qzeros(parts["qzeros"], bits, n)
        if bool((zeros != 2 ** (bits - 1)).any()):
            raise CheckpointError(
                f"{name}: quantization_config says sym=true, but read as checkpoint_format {fmt!r} its zero "
                f"points are not all {2 ** (bits - 1)}, the symmetric grid's centre: the checkpoint_format (v1 "
                "stores zero-1, gptq_v2 the zero itself) or sym in config.json is wrong"
            )
    layer.load_packed({k_: v for k_, v in parts.items() if v is not None})
    return layer


def load(
    directory: str | os.PathLike,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
    bf16_unembedding: bool = True,
) -> nn.Module:
    """Load a GPTQ checkpoint (bitcliff's or a peer's, v1 or v2) as a transformers model.

    The model is assembled on the host and moved to ``device`` once.

    Args:
        directory: checkpoint folder.
        dtype: dtype of the unquantized parameters and of the activations; None: the device's
            (:func:`bitcliff.device.compute_dtype`: fp32 on the CPU, the model's half precision on a GPU).
        device: where to put the model (``auto``, ``cpu``, ``cuda``, ``cuda:N`` or a torch device).
        trust_remote_code: passed to transformers for custom architectures; off by default.
        bf16_unembedding: on the CPU in fp32, decode steps read the (unquantized) output
            projection from a bf16 copy, half its bytes (:mod:`bitcliff.quant.unembedding`:
            +0.008 % perplexity measured; prefill and evaluation keep the fp32 weight).
    Returns:
        The model in eval mode, its quantized linears replaced by :class:`QuantLinear` (each with
        its ``dynamic`` override of bits and group size, if any), a PEFT LoRA adapter beside the
        weights attached as their low-rank terms, and the checkpoint's config attached.
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    directory = Path(directory)
    check_files_present(directory)
    model_config, qc = read_quantization_config(directory)
    fmt = qc.get("checkpoint_format", "gptq")
    files = shard_files(directory)
    tensors = read_tensors(files)

    plain = {k: v for k, v in model_config.items() if k != "quantization_config"}
    hf_config = AutoConfig.for_model(**plain) if "model_type" in plain else None
    if hf_config is None:
        raise CheckpointError(f"{directory}/config.json has no model_type")
    device = resolve_device(device)
    dtype = dtype or compute_dtype(device, trained_dtype(model_config))
    with no_init_weights(), torch.device(HOST):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype, trust_remote_code=trust_remote_code)

    quantized = sorted({k.rpartition(".")[0] for k in tensors if k.endswith(".qweight")})
    if not quantized:
        raise CheckpointError(f"{directory} has no quantized layers (no *.qweight tensors)")
    for name in quantized:
        try:
            linear = model.get_submodule(name)
        except AttributeError as exc:
            raise CheckpointError(f"{directory}: tensor {name}.qweight names no module of this model") from exc
        with torch.device(HOST):
            set_submodule(model, name, _build_layer(name, linear, tensors, qc, fmt))

    result = model.load_state_dict(tensors, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or {})
    loaded = set(quantized)
    missing = [
        k
        for k in result.missing_keys
        if k.rpartition(".")[0] not in loaded and k not in tied and not k.startswith("lm_head.")
    ]
    if "lm_head.weight" in result.missing_keys and not getattr(hf_config, "tie_word_embeddings", False):
        missing.append("lm_head.weight")
    if missing:
        raise CheckpointError(f"{directory}: tensors missing from the checkpoint: {', '.join(missing[:8])}")
    if result.unexpected_keys:
        raise CheckpointError(
            f"{directory}: tensors that fit no module: {', '.join(result.unexpected_keys[:8])}"
        )
    model.tie_weights()
    attach_config(model, config_from_qc(qc))
    for module in model.modules():  # activations follow `dtype`; the packed buffers stay as stored
        if isinstance(module, QuantLinear) and module.bias is not None:
            module.set_bias(module.bias.to(dtype))
    if has_adapter(directory):
        load_adapter(model, directory)
    if (directory / OUTLIERS_FILE).is_file():
        load_outliers(model, directory / OUTLIERS_FILE)
    if (directory / FACTORS_FILE).is_file():
        load_factors(model, directory / FACTORS_FILE)
    if bf16_unembedding and device.type == "cpu" and dtype == torch.float32:
        read_unembedding_in_bf16(model)
    return model.to(device).eval()


def load_tokenizer(directory: str | os.PathLike):
    """The tokenizer saved beside a checkpoint (or a model folder)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory))
