"""The GPTQ checkpoint format: its file names, ``quantization_config`` (written and read back,
with bitcliff's own settings under ``meta.bitcliff``), and the two zero-point conventions.

Zero points come in two conventions.  ``checkpoint_format="gptq"`` (v1, the common one) stores
``zero - 1``; ``"gptq_v2"`` stores the zero itself.  v1 cannot hold a zero point of 0 (it would
be stored as -1, and readers that add 1 to whole packed words carry into the neighbour), and
GPTQModel refuses asymmetric v1 files written by other quantizers, so :func:`resolve_format`
chooses v1 for symmetric grids (zero point 2**(bits-1), always representable) and v2 for
asymmetric ones, and ``config.json`` says which.  Both are read; v1 zero points of 2/4-bit files
are restored by adding 1 to every code of the packed *word* at once, which is the exact inverse
of how GPTQModel writes them (its word-wide subtraction borrows across codes when a zero is 0).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from bitcliff.kernels.pack import SUPPORTED_BITS, pack_qzeros, unpack_qzeros, widths_text
from bitcliff.quant.adapter import CONFIG_FILE as ADAPTER_CONFIG
from bitcliff.quant.adapter import WEIGHTS_FILE as ADAPTER_WEIGHTS
from bitcliff.quant.config import QuantConfig
from bitcliff.quant.dynamic import check_dynamic
from bitcliff.quant.factors import FACTORS_FILE
from bitcliff.quant.outliers import OUTLIERS_FILE
from bitcliff.quant.tensor_files import CheckpointError

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


#: Files a checkpoint's model is built from: when bitcliff's manifest lists one, it must be there.
MODEL_FILE_SUFFIXES = (".safetensors", ".safetensors.index.json")


#: Files read beside the weights that change what the model computes: each is bound to its
#: checkpoint by a digest in the manifest, since one copied from another checkpoint of the same
#: model fits its modules and would load silently.
SIDE_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, OUTLIERS_FILE, FACTORS_FILE)


#: Side files only bitcliff writes: without a manifest to bind them they are never loaded.
OWN_SIDE_FILES = (OUTLIERS_FILE, FACTORS_FILE)


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


def config_from_qc(qc: dict) -> QuantConfig:
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
