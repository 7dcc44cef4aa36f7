"""Loading models by name: the embedded defaults, a local folder, a hub id, or a checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def is_quantized_folder(path: str | Path) -> bool:
    """Whether ``path`` is a folder whose config.json declares a GPTQ quantization."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        qc = json.loads(cfg.read_text()).get("quantization_config") or {}
    except json.JSONDecodeError:
        return False
    return qc.get("quant_method") == "gptq"


def load_fp_model(name: str, dtype: torch.dtype = torch.float32):
    """Full-precision model and tokenizer.

    Args:
        name: "default", "gemma3-270m", a local HF folder or a hub id (see ``bitcliff.assets``).
        dtype: parameter dtype.
    Returns:
        ``(model, tokenizer, resolved_path)``; the model in eval mode on CPU.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bitcliff.assets import resolve_model

    path = resolve_model(name)
    if is_quantized_folder(path):
        raise ValueError(f"{name!r} is a quantized checkpoint; expected a full-precision model")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return model.eval(), tokenizer, path


def load_any(name: str, dtype: torch.dtype = torch.float32):
    """A quantized checkpoint folder (via ``bitcliff.load``) or a full-precision model.

    Returns:
        ``(model, tokenizer, resolved_path, quantized: bool)``.
    """
    if Path(name).is_dir() and is_quantized_folder(name):
        from bitcliff.quant.checkpoint import load, load_tokenizer

        return load(name, dtype=dtype), load_tokenizer(name), str(name), True
    model, tokenizer, path = load_fp_model(name, dtype)
    return model, tokenizer, path, False
