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

Writes are atomic: everything goes to a temporary sibling directory that is renamed into place
only when complete; an existing checkpoint is replaced only with ``overwrite=True``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from bitcliff.kernels.pack import num_groups, pack_qzeros, packed_length, unpack_qzeros
from bitcliff.quant.config import QuantConfig
from bitcliff.quant.convert import attach_config, set_submodule
from bitcliff.quant.qlinear import QuantLinear

log = logging.getLogger(__name__)

FORMATS = ("gptq", "gptq_v2")
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
QUANT_KEYS = ("qweight", "qzeros", "scales", "g_idx")
DEFAULT_SHARD_BYTES = 2 * 1024**3


class CheckpointError(ValueError):
    """A checkpoint folder that is incomplete, corrupt, or inconsistent with its config."""


# ----------------------------------------------------------------------------------- save


def _zeros_v1(layer: QuantLinear) -> torch.Tensor:
    zeros = unpack_qzeros(layer.qzeros, layer.bits, layer.out_features)
    return pack_qzeros((zeros - 1) & (2**layer.bits - 1), layer.bits)


def _all_symmetric(layers: dict[str, QuantLinear]) -> bool:
    """Every zero point sits at 2**(bits-1), the symmetric grid's centre."""
    return all(
        bool((unpack_qzeros(m.qzeros, m.bits, m.out_features) == 2 ** (m.bits - 1)).all())
        for m in layers.values()
    )


def v1_to_v2_qzeros(qzeros: torch.Tensor, bits: int, out_features: int) -> torch.Tensor:
    """v1 packed zero points (``zero - 1``) -> v2 (``zero``), int32 ``[n_groups, N*bits/32]``."""
    if bits in (2, 4):  # one code per 2/4 bits of every word: add 1 to all of them at once
        ones = sum(1 << shift for shift in range(0, 32, bits))
        words = (qzeros.to(torch.int64) + ones) & 0xFFFFFFFF
        return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    zeros = unpack_qzeros(qzeros, bits, out_features)  # 3-bit codes straddle words
    return pack_qzeros((zeros + 1) & (2**bits - 1), bits)


def _choose_format(layers: dict[str, QuantLinear], requested: str) -> str:
    has_zero_zero = any(
        bool((unpack_qzeros(m.qzeros, m.bits, m.out_features) == 0).any()) for m in layers.values()
    )
    if requested == "auto":
        return "gptq_v2" if has_zero_zero or not _all_symmetric(layers) else "gptq"
    if requested not in FORMATS:
        raise ValueError(f"checkpoint_format must be 'auto' or one of {FORMATS}, got {requested!r}")
    if requested == "gptq" and has_zero_zero:
        raise ValueError(
            "checkpoint_format='gptq' (v1 stores zero-1) cannot represent the zero point 0 that "
            "this model's asymmetric grids use; save with 'gptq_v2' or 'auto'"
        )
    return requested


def _checkpoint_tensors(model: nn.Module, fmt: str, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    layers = {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        tensors[f"{name}.qweight"] = layer.qweight
        tensors[f"{name}.qzeros"] = _zeros_v1(layer) if fmt == "gptq" else layer.qzeros
        tensors[f"{name}.scales"] = layer.scales.to(torch.float16)
        tensors[f"{name}.g_idx"] = layer.g_idx
        if layer.bias is not None:
            tensors[f"{name}.bias"] = layer.bias.to(torch.float16)
    seen: set[int] = set()
    for key, value in model.state_dict().items():
        module_name = key.rpartition(".")[0]
        if module_name in layers:
            continue
        ptr = value.untyped_storage().data_ptr()
        if ptr in seen:  # a tied weight (lm_head = embeddings): safetensors stores it once
            continue
        seen.add(ptr)
        tensors[key] = value.to(dtype) if dtype is not None and value.is_floating_point() else value
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}


def _shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, value in tensors.items():
        nbytes = value.numel() * value.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = value
        size += nbytes
    return shards


def quantization_config(config: QuantConfig, fmt: str) -> dict:
    """The ``quantization_config`` entry of config.json for ``config`` in format ``fmt``."""
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
        "meta": {"quantizer": ["bitcliff:0.1.0"], "bitcliff": config.to_dict()},
    }


def _is_checkpoint(directory: Path) -> bool:
    return (directory / "config.json").exists() or (directory / SINGLE_FILE).exists() or (
        directory / INDEX_FILE
    ).exists()


def write_folder_atomically(directory: Path, fill, overwrite: bool) -> Path:
    """Create ``directory`` by calling ``fill(tmp_dir)`` on a temporary sibling, then renaming.

    Refuses (``FileExistsError``) when ``directory`` exists and is not empty, unless
    ``overwrite``; the old folder is removed only after the new one is in place.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise FileExistsError(f"{directory} exists and is not a directory")
    if directory.exists() and any(directory.iterdir()) and not overwrite:
        what = "a checkpoint" if _is_checkpoint(directory) else "files"
        raise FileExistsError(f"{directory} already holds {what}; pass overwrite=True (--overwrite) to replace it")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        fill(tmp)
        old = None
        if directory.exists():
            old = directory.parent / f".{directory.name}.old-{os.getpid()}"
            os.replace(directory, old)
        os.replace(tmp, directory)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def save(
    model: nn.Module,
    directory: str | os.PathLike,
    tokenizer=None,
    overwrite: bool = False,
    checkpoint_format: str = "auto",
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Path:
    """Save a model quantized by :func:`bitcliff.quantize` as a GPTQ checkpoint.

    Args:
        model: transformers model whose linears are ``QuantLinear`` (``model.bitcliff_config`` set).
        directory: output folder (created; refused if non-empty unless ``overwrite``).
        tokenizer: saved beside the weights when given.
        overwrite: replace an existing folder.
        checkpoint_format: "auto", "gptq" (v1) or "gptq_v2"; see the module docstring.
        dtype: dtype of the unquantized floating tensors (embeddings, norms, head); ``None``
            keeps the model's own, so the reloaded model computes exactly what was saved.
        max_shard_bytes: shard size limit; one ``model.safetensors`` when everything fits.
    Returns:
        The checkpoint folder.
    """
    config = getattr(model, "bitcliff_config", None)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    if config is None or not layers:
        raise ValueError("model is not quantized: run bitcliff.quantize(model, QuantConfig(...)) first")
    fmt = _choose_format(layers, checkpoint_format)
    tensors = _checkpoint_tensors(model, fmt, dtype)
    model_config = model.config.to_dict()
    model_config["quantization_config"] = quantization_config(config, fmt)
    stored = dtype or model.get_input_embeddings().weight.dtype
    model_config["dtype"] = str(stored).removeprefix("torch.")

    def fill(tmp: Path) -> None:
        shards = _shards(tensors, max_shard_bytes)
        meta = {"format": "pt"}
        if len(shards) == 1:
            save_file(shards[0], tmp / SINGLE_FILE, metadata=meta)
        else:
            weight_map = {}
            for i, shard in enumerate(shards, 1):
                fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, tmp / fname, metadata=meta)
                weight_map.update({k: fname for k in shard})
            total = sum(v.numel() * v.element_size() for v in tensors.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2))
        (tmp / "config.json").write_text(json.dumps(model_config, indent=2, sort_keys=True))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    path = write_folder_atomically(Path(directory), fill, overwrite)
    log.info("saved %d quantized layers to %s (checkpoint_format=%s)", len(layers), path, fmt)
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
    fmt = qc.get("checkpoint_format", "gptq")
    if fmt not in FORMATS:
        raise CheckpointError(f"{directory}: unsupported checkpoint_format {fmt!r}, expected one of {FORMATS}")
    bits, group_size = qc.get("bits"), qc.get("group_size", -1)
    if bits not in (2, 3, 4):
        raise CheckpointError(f"{directory}: quantization_config bits={bits!r}; bitcliff reads 2, 3 or 4")
    if not isinstance(group_size, int) or (group_size != -1 and group_size <= 0):
        raise CheckpointError(f"{directory}: quantization_config group_size={group_size!r} is invalid")
    return model_config, qc


def shard_files(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint, all checked to exist."""
    index = directory / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise CheckpointError(f"{index} is not a valid safetensors index: {exc}") from exc
        files = [directory / name for name in sorted(set(weight_map.values()))]
    elif (directory / SINGLE_FILE).exists():
        files = [directory / SINGLE_FILE]
    else:
        raise CheckpointError(f"{directory} holds no {SINGLE_FILE} and no {INDEX_FILE}")
    missing = [f.name for f in files if not f.exists()]
    if missing:
        raise CheckpointError(f"{directory}: shard(s) listed in the index are missing: {', '.join(missing)}")
    return files


def read_tensors(files: list[Path]) -> dict[str, torch.Tensor]:
    """All tensors of the shards; a truncated or corrupt file raises ``CheckpointError``."""
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    tensors[key] = f.get_tensor(key)
        except Exception as exc:  # safetensors raises its own error types for bad headers/sizes
            raise CheckpointError(f"{path} could not be read (truncated or corrupt?): {exc}") from exc
    return tensors


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
    bits, group_size = qc["bits"], qc.get("group_size", -1)
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
    layer = QuantLinear(k, n, bits, group_size, n_groups, parts["bias"] is not None, name)
    if fmt == "gptq":  # v1 stores zero - 1
        if tuple(parts["qzeros"].shape) != (n_groups, packed_length(n, bits)):
            raise CheckpointError(
                f"{name}.qzeros has shape {tuple(parts['qzeros'].shape)}, expected ({n_groups}, {packed_length(n, bits)})"
            )
        parts["qzeros"] = v1_to_v2_qzeros(parts["qzeros"], bits, n)
    layer.load_packed({k_: v for k_, v in parts.items() if v is not None})
    return layer


def load(
    directory: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
) -> nn.Module:
    """Load a GPTQ checkpoint (bitcliff's or a peer's, v1 or v2) as a transformers model.

    Args:
        directory: checkpoint folder.
        dtype: dtype of the unquantized parameters and of the activations.
        device: where to put the model.
        trust_remote_code: passed to transformers for custom architectures; off by default.
    Returns:
        The model in eval mode, its quantized linears replaced by :class:`QuantLinear`, with
        ``model.bitcliff_config`` describing the checkpoint.
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    directory = Path(directory)
    model_config, qc = read_quantization_config(directory)
    fmt = qc.get("checkpoint_format", "gptq")
    files = shard_files(directory)
    tensors = read_tensors(files)

    plain = {k: v for k, v in model_config.items() if k != "quantization_config"}
    hf_config = AutoConfig.for_model(**plain) if "model_type" in plain else None
    if hf_config is None:
        raise CheckpointError(f"{directory}/config.json has no model_type")
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype, trust_remote_code=trust_remote_code)

    quantized = sorted({k.rpartition(".")[0] for k in tensors if k.endswith(".qweight")})
    if not quantized:
        raise CheckpointError(f"{directory} has no quantized layers (no *.qweight tensors)")
    for name in quantized:
        try:
            linear = model.get_submodule(name)
        except AttributeError as exc:
            raise CheckpointError(f"{directory}: tensor {name}.qweight names no module of this model") from exc
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
            module.bias = module.bias.to(dtype)
    return model.to(device).eval()


def load_tokenizer(directory: str | os.PathLike):
    """The tokenizer saved beside a checkpoint (or a model folder)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory))
