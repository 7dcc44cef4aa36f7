"""GPTQ-format checkpoints: config.json with ``quantization_config`` + safetensors shards.

On disk each quantized linear ``<name>`` has ``<name>.qweight`` (int32 ``[K*bits/32, N]``),
``<name>.qzeros`` (int32 ``[n_groups, N*bits/32]``), ``<name>.scales`` (fp16 ``[n_groups, N]``),
``<name>.g_idx`` (int32 ``[K]``) and optionally ``<name>.bias`` (fp16 ``[N]``): the layout that
GPTQModel, transformers and vLLM read.

Zero points come in two conventions.  ``checkpoint_format="gptq"`` (v1, the common one) stores
``zero - 1``; ``"gptq_v2"`` stores the zero itself.  v1 cannot hold a zero point of 0 (it would
be stored as -1, and readers that add 1 to whole packed words carry into the neighbour), and
GPTQModel refuses asymmetric v1 files written by other quantizers, so ``save`` writes v1 for
symmetric grids (zero point 2**(bits-1), always representable) and v2 for asymmetric ones, and
says which in ``config.json``.  ``load`` reads both; v1 zero points of 2/4-bit files are
restored by adding 1 to every code of the packed *word* at once, which is the exact inverse of
how GPTQModel writes them (its word-wide subtraction borrows across codes when a zero is 0).

This module is the one writer and reader of the format: :func:`save` for a model in memory, and
the pieces the streaming GPTQ writer assembles a checkpoint from (:func:`resolve_format`,
:func:`checkpoint_tensors`, :func:`config_json`, :func:`write_index`).  Writes are atomic
(:mod:`bitcliff.storage`): everything goes to a temporary sibling folder that is renamed into
place only when complete; an existing checkpoint is replaced only with ``overwrite=True``, and
only if bitcliff wrote it.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from bitcliff.device import HOST, compute_dtype, resolve_device, trained_dtype
from bitcliff.kernels.pack import (
    SUPPORTED_BITS,
    num_groups,
    pack_qzeros,
    packed_length,
    unpack_qzeros,
    widths_text,
)
from bitcliff.layers import architecture_of
from bitcliff.quant.adapter import CONFIG_FILE as ADAPTER_CONFIG
from bitcliff.quant.adapter import WEIGHTS_FILE as ADAPTER_WEIGHTS
from bitcliff.quant.adapter import adapter_tensors, has_adapter, load_adapter
from bitcliff.quant.config import QuantConfig
from bitcliff.quant.dynamic import check_dynamic, dynamic_entries, dynamic_override, module_overrides
from bitcliff.quant.factors import FACTORS_FILE
from bitcliff.quant.gptq_model import gptq_log, write_gptq_log
from bitcliff.quant.outliers import OUTLIERS_FILE
from bitcliff.quant.qlinear import QuantLinear
from bitcliff.quant.repair_files import (
    factor_tensors,
    load_factors,
    load_outliers,
    outlier_tensors,
)
from bitcliff.quant.surgery import attach_config, quant_config, set_submodule
from bitcliff.quant.tensor_files import (  # noqa: F401 - CheckpointError and MissingShardError are part of this API
    CheckpointError,
    MissingShardError,
    check_finite_tensor,
    read_tensors,
)
from bitcliff.quant.unembedding import read_unembedding_in_bf16
from bitcliff.storage import MANIFEST, file_sha256, read_manifest, replace_folder, save_tensors, write_json

log = logging.getLogger(__name__)

FORMATS = ("gptq", "gptq_v2")
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
QUANT_KEYS = ("qweight", "qzeros", "scales", "g_idx")
DEFAULT_SHARD_BYTES = 2 * 1024**3
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "generation_config.json",
)
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


# ----------------------------------------------------------------------------------- save


def resolve_format(requested: str, sym: bool) -> str:
    """The zero-point convention to write: ``"auto"`` gives v1 (``"gptq"``) for symmetric grids,
    whose zero point 2**(bits-1) v1 always holds, and ``"gptq_v2"`` for asymmetric ones, whose
    zero point may be 0 (and which GPTQModel refuses as v1 from other quantizers).

    Raises:
        ValueError: an unknown format, or v1 requested for an asymmetric grid.
    """
    if requested == "auto":
        return "gptq" if sym else "gptq_v2"
    if requested not in FORMATS:
        raise ValueError(f"checkpoint_format must be 'auto' or one of {FORMATS}, got {requested!r}")
    if requested == "gptq" and not sym:
        raise ValueError(
            "checkpoint_format='gptq' (v1 stores zero-1) cannot hold the zero point 0 that asymmetric "
            "grids use; save with 'gptq_v2' or 'auto'"
        )
    return requested


def v1_to_v2_qzeros(qzeros: torch.Tensor, bits: int, out_features: int) -> torch.Tensor:
    """v1 packed zero points (``zero - 1``) -> v2 (``zero``), int32 ``[n_groups, N*bits/32]``."""
    if bits in (2, 4):  # one code per 2/4 bits of every word: add 1 to all of them at once
        ones = sum(1 << shift for shift in range(0, 32, bits))
        words = (qzeros.to(torch.int64) + ones) & 0xFFFFFFFF
        return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    zeros = unpack_qzeros(qzeros, bits, out_features)  # 3-bit codes straddle words
    return pack_qzeros((zeros + 1) & (2**bits - 1), bits)


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


def quantization_config(config: QuantConfig, fmt: str) -> dict:
    """The ``quantization_config`` entry of config.json for ``config`` in format ``fmt``.

    ``meta.bitcliff`` records the whole config and the format it was written in, so that a
    hand-edited ``checkpoint_format`` is caught on load instead of misreading every zero point.
    """
    return {
        "quant_method": "gptq",
        "bits": config.bits,
        "group_size": config.group_size,
        "sym": config.sym,
        "desc_act": config.act_order,
        "static_groups": config.static_groups,
        "true_sequential": config.true_sequential,
        "damp_percent": config.damp_percent,
        "checkpoint_format": fmt,
        "lm_head": False,
        "meta": {"quantizer": ["bitcliff:0.1.0"], "bitcliff": {**config.to_dict(), "checkpoint_format": fmt}},
    }


def config_json(model_config: dict, config: QuantConfig, fmt: str, stored_dtype: torch.dtype,
                dynamic: dict | None = None) -> dict:
    """``config.json`` of a checkpoint: the model's own config plus ``quantization_config`` (with
    per-module ``dynamic`` overrides when there are any) and the dtype of its unquantized tensors."""
    qc = quantization_config(config, fmt)
    if dynamic:
        qc["dynamic"] = dynamic
    return {**model_config, "quantization_config": qc, "dtype": str(stored_dtype).removeprefix("torch.")}


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


# ----------------------------------------------------------------------------------- load


def read_quantization_config(directory: Path) -> tuple[dict, dict]:
    """``(model_config_dict, quantization_config)`` of a checkpoint folder, validated."""
    cfg_path = directory / "config.json"
    if not cfg_path.exists():
        raise CheckpointError(f"{directory} is not a checkpoint folder: config.json is missing")
    try:
        model_config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{cfg_path} is not valid JSON: {exc}") from exc
    qc = model_config.get("quantization_config")
    if not isinstance(qc, dict) or qc.get("quant_method") != "gptq":
        raise CheckpointError(
            f"{directory} is not a GPTQ checkpoint: config.json has no quantization_config "
            "with quant_method 'gptq'"
        )
    _check_fields(directory, qc)
    fmt = qc.get("checkpoint_format", "gptq")
    if fmt not in FORMATS:
        raise CheckpointError(f"{directory}: unsupported checkpoint_format {fmt!r}, expected one of {FORMATS}")
    written = ((qc.get("meta") or {}).get("bitcliff") or {}).get("checkpoint_format")
    if written is not None and written != fmt:
        raise CheckpointError(
            f"{directory}: config.json says checkpoint_format {fmt!r}, but bitcliff wrote this checkpoint as "
            f"{written!r} (quantization_config.meta.bitcliff); reading it as {fmt!r} would misread every zero "
            f"point. Set checkpoint_format back to {written!r}"
        )
    bits, group_size = qc.get("bits"), qc.get("group_size", -1)
    if bits not in SUPPORTED_BITS:
        raise CheckpointError(f"{directory}: quantization_config bits={bits!r}; bitcliff reads {widths_text()}")
    if not isinstance(group_size, int) or (group_size != -1 and group_size <= 0):
        raise CheckpointError(f"{directory}: quantization_config group_size={group_size!r} is invalid")
    return model_config, qc


# The flags a GPTQ config holds as true/false, and the mappings bitcliff reads its own settings from.
_BOOL_FIELDS = ("sym", "desc_act", "static_groups", "true_sequential")


def _check_fields(directory: Path, qc: dict) -> None:
    """Refuse, on load, the rest of a hand-edited ``quantization_config`` that loading reads,
    naming the field: later it would fail with a regex or type error, or be read as something else
    (``"sym": "false"`` is true)."""
    for key in _BOOL_FIELDS:
        if key in qc and not isinstance(qc[key], bool):
            raise CheckpointError(f"{directory}: quantization_config.{key} must be true or false, got {qc[key]!r}")
    damp = qc.get("damp_percent")
    if damp is not None and (isinstance(damp, bool) or not isinstance(damp, (int, float))):
        raise CheckpointError(f"{directory}: quantization_config.damp_percent must be a number, got {damp!r}")
    meta = qc.get("meta")
    if meta is not None and not isinstance(meta, dict):
        raise CheckpointError(f"{directory}: quantization_config.meta must be a mapping, got {type(meta).__name__}")
    if meta and meta.get("bitcliff") is not None and not isinstance(meta["bitcliff"], dict):
        raise CheckpointError(f"{directory}: quantization_config.meta.bitcliff must be a mapping, "
                              f"got {type(meta['bitcliff']).__name__}")
    try:
        check_dynamic(qc.get("dynamic"))
    except ValueError as error:
        raise CheckpointError(f"{directory}: {error}") from error


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


#: Files a checkpoint's model is built from: when bitcliff's manifest lists one, it must be there.
_MODEL_FILE_SUFFIXES = (".safetensors", ".safetensors.index.json")

#: Files read beside the weights that change what the model computes: each is bound to its
#: checkpoint by a digest in the manifest, since one copied from another checkpoint of the same
#: model fits its modules and would load silently.
SIDE_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, OUTLIERS_FILE, FACTORS_FILE)
#: Side files only bitcliff writes: without a manifest to bind them they are never loaded.
_OWN_SIDE_FILES = (OUTLIERS_FILE, FACTORS_FILE)


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
            if name in _OWN_SIDE_FILES:
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
                                                    or f.endswith(_MODEL_FILE_SUFFIXES))]
    missing = [f for f in needed if not (directory / f).is_file()]
    if missing:
        raise CheckpointError(f"{directory} lacks {', '.join(missing)}, which bitcliff wrote there and the model is "
                              "built from: the checkpoint is incomplete; copy the whole folder again or re-create it")


def _config_from_qc(qc: dict) -> QuantConfig:
    stored = (qc.get("meta") or {}).get("bitcliff") or {}
    base = {
        "bits": qc["bits"],
        "group_size": qc.get("group_size", -1),
        "sym": bool(qc.get("sym", True)),
        "act_order": bool(qc.get("desc_act", False)),
        "static_groups": bool(qc.get("static_groups", False)),
        "true_sequential": bool(qc.get("true_sequential", False)),
    }
    if "damp_percent" in qc:
        base["damp_percent"] = qc["damp_percent"]
    return QuantConfig.from_dict({**stored, **base})


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
    attach_config(model, _config_from_qc(qc))
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
